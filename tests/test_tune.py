"""`sdpo tune` for real: a 4-trial search over orderings and stage 2's learning rate on the quickstart's
tiny model, run as the CLI on its own local Ray instance. Checks that ASHA prunes at a stage boundary,
that trials sharing their first stage reuse it from the stage store instead of training it again, that
the metrics the space loader accepts are the ones trials report, and that the outputs (results table,
plot, best_job.yaml) are written and usable."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdpo.config import parse_job
from sdpo.tuning import load_space, reported_metrics

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))
SDPO = [sys.executable, "-m", "sdpo.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_loads_and_opens_with_its_command(path):
    space = load_space(path)  # checks every point of the space
    first = path.read_text().splitlines()[0]
    assert first == f"# sdpo tune tune_spaces/{path.name}", first
    assert space.search


def test_there_are_the_three_spaces():
    assert {p.name for p in SPACES} >= {"orderings.yaml", "strategies.yaml", "beta_lr.yaml"}


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    job = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    job["data"]["sources"] = [{"name": "easy", "path": "builtin:quickstart/easy", "max_rows": 220},
                              {"name": "hard", "path": "builtin:quickstart/hard", "max_rows": 220}]
    job["data"]["eval"] = {"fraction": 0.1}
    job["reference"] = {"mode": "online", "gamma": False}  # the search is about schedules, not passes
    space = {
        "name": "ord",
        "job": job,
        # every trial has 2 stages (ASHA compares trials at the same stage); the two easy-first trials share
        # stage 1 (easy), the two hard-first ones stage 1 (hard): they differ in stage 2's learning rate
        "search": {"partition_order": {"grid": [["easy", "hard"], ["hard", "easy"]]},
                   "stages.1.learning_rate": {"grid": [1.0e-3, 5.0e-4]}},
        "searcher": "grid",
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "metric": "eval/easy/reward_accuracy",  # high after an easy stage, at chance after a hard one
        "mode": "max",
    }
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp / "out"
    r = subprocess.run(SDPO + ["tune", str(path), "--output", str(out)], capture_output=True, text=True,
                       env=ENV, timeout=1100)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    return out, rows, r.stdout + r.stderr, parse_job(job)


@pytest.mark.timeout(1200)
def test_every_trial_reported(search):
    out, rows, _, _ = search
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    orders = sorted(r["order"] for r in rows)
    assert orders == ["easy→hard", "easy→hard", "hard→easy", "hard→easy"]
    assert (out / "results.md").read_text().count("\n|") >= 5
    assert (out / "metric.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(1200)
def test_prefix_stages_are_reused_not_retrained(search):
    out, rows, log, _ = search
    assert sum(int(r["reused"]) for r in rows) == 2  # the second trial of each order reuses stage 1
    store = out / "stage_store"
    entries = [d for d in store.iterdir() if (d / "_COMPLETE.json").exists()]
    assert len(entries) == sum(int(r["stages"]) - int(r["reused"]) for r in rows)  # each stage trained once
    assert "reused from other trials" in log
    # a reused stage is the very model its first trial trained: byte-identical weights
    easy = [r for r in rows if r["order"] == "easy→hard"]
    trainer, reuser = sorted(easy, key=lambda r: int(r["reused"]))
    assert (int(trainer["reused"]), int(reuser["reused"])) == (0, 1)
    trained = out / "trials" / trainer["trial"] / "stages" / "1" / "model" / "model.safetensors"
    summary = json.loads((out / "trials" / reuser["trial"] / "summary.json").read_text())
    first = summary["stages"][0]
    assert first["reused_from"] and first["model"].startswith(str(store))
    assert (Path(first["model"]) / "model.safetensors").read_bytes() == trained.read_bytes()
    assert summary["stages"][1]["reference"] == first["model"]  # stage 2 trained against the reused model


@pytest.mark.timeout(1200)
def test_the_metrics_the_loader_accepts_are_the_ones_trials_report(search):
    """`tuning.reported_metrics` (what a space's metric is checked against) names only metrics a trained
    stage's record holds."""
    out, rows, _, job = search
    trainer = next(r for r in rows if r["order"] == "easy→hard" and r["reused"] == "0")
    metrics = json.loads((out / "trials" / trainer["trial"] / "summary.json").read_text())["stages"][0]["metrics"]
    assert set(reported_metrics(job)) - set(metrics) == set()


@pytest.mark.timeout(1200)
def test_asha_prunes_at_a_stage_boundary(search):
    _, rows, _, _ = search
    pruned = [r for r in rows if r["pruned"].lower() == "true"]
    assert pruned, rows
    assert all(r["order"] == "hard→easy" and r["stages"] == "1" for r in pruned)


@pytest.mark.timeout(1200)
def test_best_job_reproduces_the_best_trial(search):
    out, rows, _, _ = search
    best = rows[0]
    assert best["order"] == "easy→hard"
    text = (out / "best_job.yaml").read_text()
    assert text.startswith("# sdpo run best_job.yaml")
    job = parse_job(yaml.safe_load(text))
    assert job.partitioning.order == best["order"].split("→")
    # rerun it: the same final metric (training is deterministic here; "within noise" elsewhere)
    rerun = out.parent / "best_rerun"
    r = subprocess.run(SDPO + ["run", str(out / "best_job.yaml"), "--output", str(rerun)], capture_output=True,
                       text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((rerun / "summary.json").read_text())["stages"][-1]["metrics"]["eval/easy/reward_accuracy"]
    assert final == pytest.approx(float(best["final"]), abs=0.02)
