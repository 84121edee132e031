"""The README's commands, run as a user runs them: `sdpo validate` and `sdpo run jobs/quickstart.yaml`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def sdpo(*args, cache, timeout=540):
    env = os.environ | {"SDPO_CACHE": str(cache), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "sdpo.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sdpo-cache")


def test_quickstart_trains_two_stages_and_improves_held_out_accuracy(cache, tmp_path):
    out = tmp_path / "qs"
    proc = sdpo("run", "jobs/quickstart.yaml", "--output", str(out), cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the plan is printed before training, then one result line per stage
    text = proc.stdout
    assert text.index("partition") < text.index("stage 1 done") < text.index("stage 2 done")
    summary = json.loads((out / "summary.json").read_text())
    s1, s2 = summary["stages"]
    assert (s1["partition"], s2["partition"]) == ("easy", "hard")
    assert s2["reference"] == s1["model"]
    # stage 1 teaches the easy family, stage 2 the hard one; both are held-out pairs
    assert s1["metrics"]["eval/easy/ranking_accuracy"] >= s1["metrics"]["before/eval/easy/ranking_accuracy"] + 0.2
    assert s2["metrics"]["eval/hard/ranking_accuracy"] >= s2["metrics"]["before/eval/hard/ranking_accuracy"] + 0.2
    assert s2["metrics"]["eval/ranking_accuracy"] > s1["metrics"]["before/eval/ranking_accuracy"] + 0.2
    assert (out / "stages" / "2" / "model" / "model.safetensors").is_file()
    assert (out / "stages" / "2" / "model" / "tokenizer.json").is_file()
    assert not (out / ".sdpo-run.lock").exists()  # the run's claim on its folder, given back


def test_validate_prints_the_plan_without_training(cache, tmp_path):
    proc = sdpo("validate", "jobs/quickstart.yaml", "--output", str(tmp_path / "v"), cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config and data OK" in proc.stdout and "held-out pairs" in proc.stdout
    assert not (tmp_path / "v" / "stages").exists()


def test_bad_config_exits_2_with_the_key_and_no_traceback(cache, tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text((ROOT / "jobs" / "quickstart.yaml").read_text().replace("lr_scheduler: linear", "lr_schedule: linear"))
    proc = sdpo("run", str(job), "--set", "loss.beta=-1", cache=cache, timeout=120)
    assert proc.returncode == 2
    assert "training.lr_schedule: unknown key" in proc.stderr and "loss.beta" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refuses_to_overwrite_a_run_without_the_flag(cache, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    proc = sdpo("run", "jobs/quickstart.yaml", "--output", str(out), cache=cache, timeout=120)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "summary.json").read_text() == "{}"


def test_a_folder_another_run_is_writing_is_refused_even_with_overwrite(cache, tmp_path):
    """Two runs into one folder (a job submitted twice, --overwrite or --resume of a run still going)
    would delete and mix each other's files: the second is refused, naming the first, before any work."""
    from sdpo.locks import Lease

    out = tmp_path / "busy"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "manifest.json").write_text("{}")  # a run directory, so --resume gets as far as the claim
    running = Lease(str(out / ".sdpo-run.lock"))
    assert running.acquire()  # a live run (this test's process) is writing there
    try:
        for args in (["run", "jobs/quickstart.yaml", "--output", str(out), "--overwrite"],
                     ["run", "jobs/quickstart.yaml", "--resume", str(out)], ["validate", "jobs/quickstart.yaml", "--output", str(out)]):
            proc = sdpo(*args, cache=cache, timeout=120)
            assert proc.returncode == 2, (args, proc.stderr[-2000:])
            assert "in use by another sdpo run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [".sdpo-run.lock", "manifest.json", "summary.json"]
        assert (out / "summary.json").read_text() == "{}"
    finally:
        running.release()
