"""`sdpo report`: the stage table matches summary.json cell for cell, the plots are valid PNGs,
older runs without γ or cache records still render, and the CLI exits 2 naming a missing file. No Ray."""

import json
import math
import subprocess
import sys

import fsspec
import pytest

from sdpo.cli import main
from sdpo.report import COLUMNS, MISSING, format_value, stage_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCES = ["orca", "ultra"]
# held-out metric -> (value for the base model, change per stage): accuracies and margins rise, log-probs fall
EVAL_TRENDS = {"reward_accuracy": (0.5, 0.1), "margin": (0.0, 0.35), "loss": (0.6931, -0.06),
               "reward_accuracy_vs_ref": (0.5, 0.06), "margin_vs_ref": (0.0, 0.2), "loss_vs_ref": (0.6931, -0.04),
               "ranking_accuracy": (0.45, 0.12), "logps_chosen": (-41.3, -1.5), "logps_rejected": (-43.9, -3.2)}


# --------------------------------------------------------------------------------------------------
# A synthetic two-stage run, shaped like what `sdpo run` writes
# --------------------------------------------------------------------------------------------------
def eval_metrics(prefix: str, after_stage: int) -> dict:
    out = {f"{prefix}eval/num_pairs": 24.0} | {f"{prefix}eval/{src}/num_pairs": 12.0 for src in SOURCES}
    for n, scope in enumerate([""] + [f"{src}/" for src in SOURCES]):
        out |= {f"{prefix}eval/{scope}{key}": round(v0 + dv * after_stage * (1 + 0.3 * n), 6)
                for key, (v0, dv) in EVAL_TRENDS.items()}
    return out


def histogram(center: float) -> dict:
    edges = [center - 5 + 0.2 * i for i in range(51)]
    return {"edges": edges, "counts": [int(20 * math.exp(-((i - 25) / 8) ** 2)) for i in range(50)]}


def cache_entry(status: str) -> dict:
    return {"key": "ab" * 32, "status": status, "path": "/cache/x", "seconds": 1.5, "pairs_per_s": 26.0}


def stage(index: int, partition: str, gamma_ref: float) -> dict:
    metrics = {
        "first_step_loss": 0.6931, "train/loss": 0.61 - 0.1 * index, "final/loss": 0.55 - 0.1 * index,
        "train/rewards/accuracies": 0.7, "steps": 3, "pairs_per_s": 12.5, "wall_seconds": 40.0 + index,
        "gamma_ref/mean": gamma_ref, "gamma_ref/median": gamma_ref - 0.25, "gamma_ref/std": 2.0,
        "gamma_base/mean": 0.4, "gamma_base/median": 0.3, "gamma_base/std": 2.1,
    } | eval_metrics("", index) | eval_metrics("before/", index - 1)
    return {"index": index, "partition": partition, "num_pairs": 39 + index, "reference": "base", "init": "base",
            "model": f"/run/stages/{index}/model", "metrics": metrics,
            "gamma": {"ref": histogram(gamma_ref), "base": histogram(0.4)},
            "cache": {"reference": cache_entry("miss" if index == 1 else "hit"), "base": cache_entry("hit")}}


def make_summary() -> dict:
    return {"job": "two-stage", "config": {}, "base_model": "/models/sft", "plan": [], "data": {},
            "stages": [stage(1, "orca", 0.4), stage(2, "ultra", 1.7)], "final_model": "/run/stages/2/model"}


def step_log(steps: int) -> str:
    return "".join(json.dumps({"step": s, "epoch": 0, "pairs": 16.0, "lr": 1e-6, "grad_norm": 1.0,
                               "loss": 0.69 - 0.05 * s, "rewards/accuracies": 0.5 + 0.1 * s,
                               "logps/chosen": -40.0, "logps/rejected": -45.0}) + "\n"
                   for s in range(1, steps + 1))


def write_run(run_dir, summary: dict, logs: bool = True):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for s in summary["stages"] if logs else []:
        (run_dir / "stages" / str(s["index"])).mkdir(parents=True)
        (run_dir / "stages" / str(s["index"]) / "trainer_log.jsonl").write_text(step_log(3))
    return run_dir


def parse_table(table: str) -> list[dict[str, str]]:
    header, _, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return [dict(zip(header, row, strict=True)) for row in rows]


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------
def test_format_value():
    assert (format_value(None), format_value(39), format_value(0.123456), format_value("hit")) == (
        MISSING, "39", "0.1235", "hit")


def test_report_writes_markdown_and_three_valid_pngs(tmp_path):
    from PIL import Image

    run_dir = write_run(tmp_path / "run", make_summary())
    report = write_report(str(run_dir))
    assert report.markdown_path == str(run_dir / "report.md")
    names = ("training", "gamma", "heldout")
    assert sorted(report.plots) == sorted(str(run_dir / "plots" / f"{n}.png") for n in names)
    for path in report.plots:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        with Image.open(path) as img:
            img.verify()
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# sDPO run report: two-stage")
    assert report.table in text and "## Held-out pairs by source" in text and "What to look for" in text
    for name in ("training", "gamma", "heldout"):
        assert f"](plots/{name}.png)" in text


def test_stage_table_cells_equal_summary_values(tmp_path):
    summary = make_summary()
    rows = parse_table(stage_table(summary))
    assert [r["stage"] for r in rows] == ["0 (base)", "1", "2"]
    assert [h for h, _ in COLUMNS] == list(rows[0])
    keys = {"γ_ref mean": "gamma_ref/mean", "γ_ref median": "gamma_ref/median", "γ_base mean": "gamma_base/mean",
            "first-step loss": "first_step_loss", "final train loss": "final/loss",
            "eval reward acc (vs base)": "eval/reward_accuracy",
            "eval reward acc (vs ref)": "eval/reward_accuracy_vs_ref",
            "eval ranking acc": "eval/ranking_accuracy", "eval margin (vs base)": "eval/margin",
            "eval logps chosen": "eval/logps_chosen", "eval logps rejected": "eval/logps_rejected",
            "eval loss (vs base)": "eval/loss"}
    for row, s in zip(rows[1:], summary["stages"], strict=True):
        assert row["partition"] == s["partition"] and row["pairs"] == format_value(s["num_pairs"])
        assert row["ref cache (hit/miss)"] == s["cache"]["reference"]["status"]
        for column, key in keys.items():
            assert row[column] == format_value(s["metrics"][key]), (column, row["stage"])
    base, before = rows[0], summary["stages"][0]["metrics"]
    for column, key in keys.items():
        expected = format_value(before[f"before/{key}"]) if key.startswith("eval/") else MISSING
        assert base[column] == expected, column
    assert base["partition"] == base["pairs"] == base["ref cache (hit/miss)"] == MISSING


def test_missing_metrics_show_a_dash():
    summary = make_summary()
    for key in ("gamma_ref/median", "eval/logps_chosen", "final/loss"):
        del summary["stages"][1]["metrics"][key]
    del summary["stages"][0]["metrics"]["before/eval/margin"]
    rows = parse_table(stage_table(summary))
    assert rows[2]["γ_ref median"] == rows[2]["eval logps chosen"] == rows[2]["final train loss"] == MISSING
    assert rows[0]["eval margin (vs base)"] == MISSING
    assert rows[1]["γ_ref median"] == format_value(summary["stages"][0]["metrics"]["gamma_ref/median"])


def test_run_without_gamma_cache_or_logs_still_renders(tmp_path):
    summary = make_summary()
    for s in summary["stages"]:
        del s["gamma"]
        s["cache"] = None if s["index"] == 1 else {"reference": None, "base": None}
        s["metrics"] = {k: v for k, v in s["metrics"].items() if not k.startswith("gamma_")}
    run_dir = write_run(tmp_path / "old", summary, logs=False)
    report = write_report(str(run_dir))
    assert report.plots == [str(run_dir / "plots" / "heldout.png")]
    text = (run_dir / "report.md").read_text()
    assert "No γ histograms recorded for stage(s) [1, 2]" in text and "No reference cache entry" in text
    assert "gamma.png not drawn" in text and "training.png not drawn" in text and "(plots/gamma.png)" not in text
    rows = parse_table(report.table)
    assert all(r["γ_ref mean"] == r["ref cache (hit/miss)"] == MISSING for r in rows)


def test_report_reads_and_writes_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/sdpo-report-test/run/summary.json", json.dumps(make_summary()).encode())
    fs.pipe_file("/sdpo-report-test/run/stages/1/trainer_log.jsonl", step_log(3).encode())
    try:
        report = write_report("memory://sdpo-report-test/run")
        assert report.markdown_path == "memory://sdpo-report-test/run/report.md"
        assert fs.cat_file("/sdpo-report-test/run/plots/gamma.png")[:8] == PNG_MAGIC
        text = fs.cat_file("/sdpo-report-test/run/report.md").decode()
        assert "No `trainer_log.jsonl` for stage(s) [2]" in text and "](plots/training.png)" in text
    finally:
        fs.rm("/sdpo-report-test", recursive=True)


def test_cli_report_prints_the_table(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", make_summary())
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert stage_table(make_summary()) in out and str(run_dir / "report.md") in out


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_cli_report_exits_2_naming_the_file(tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "summary.json").write_text(content)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run_dir / "summary.json") in err and "Traceback" not in err


def test_report_never_imports_ray():
    code = "import sys, sdpo.report, sdpo.cli; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_score_strategies_get_a_histogram_per_stage_and_the_dropped_pairs(tmp_path):
    from PIL import Image

    summary = make_summary()
    summary["scores"] = {
        "strategy": "easy_to_hard", "descending": True,
        "base_pass": {"status": "hit", "path": "cache/scores/abc"},
        "histograms": {"score": {"part1": {"edges": [0, 1, 2], "counts": [0, 5]},
                                 "part2": {"edges": [0, 1, 2], "counts": [5, 0]}},
                       "learnability": {"part1": {"edges": [0, 1, 2], "counts": [1, 4]},
                                        "_dropped": {"edges": [0, 1, 2], "counts": [3, 0]}}},
        "selection": {"strategy": "learnability_top", "top_fraction": 0.5, "loss": "margin", "kept": 10,
                      "dropped": 3, "dropped_by_source": {"easy": 1, "hard": 2}, "dropped_pairs_file": "d.jsonl"},
    }
    run_dir = write_run(tmp_path / "run", summary)
    report = write_report(str(run_dir))
    scores = str(run_dir / "plots" / "scores.png")
    assert scores in report.plots
    with Image.open(scores) as img:
        img.verify()
    text = (run_dir / "report.md").read_text()
    assert "## Ordering and selection" in text and "(plots/scores.png)" in text
    assert "kept 10 training pairs, dropped 3 (easy 1, hard 2)" in text and "`d.jsonl`" in text
    assert "base pass: cache hit" in text
