"""Concurrent trials sharing the pass cache: three trials of a beta search run at once (a Ray instance
with 10 logical CPUs fits three trial shares) and all need the same cache entries at the same moment —
the base model's held-out pass and stage 1's reference pass. Each entry must be scored once, by one
trial, under its lease, with the others waiting for it: before leases, every trial wrote its own files
into the same folder, and the trials failed on "scoring pass wrote 320 rows ..., expected 160" (or one
trial's check passed before another's files landed, leaving an entry with duplicated rows)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    import ray
    from ray.data import DataContext

    from sdpo.pipeline import local_ray_options
    from sdpo.tune import run_tune

    tmp = tmp_path_factory.mktemp("tune_concurrent")
    ray.init(num_cpus=10, include_dashboard=False, **local_ray_options(10), object_store_memory=300 * 1024 * 1024,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=True)
    DataContext.get_current().enable_progress_bars = False
    job = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    job["data"]["sources"] = [{"name": "easy", "path": "builtin:quickstart/easy", "max_rows": 200}]
    job["data"]["eval"] = {"fraction": 0.1}
    space = {"name": "betas", "job": job, "search": {"loss.beta": {"grid": [0.05, 0.1, 0.2]}},
             "searcher": "grid", "scheduler": {"type": "fifo"}, "metric": "eval/reward_accuracy", "mode": "max"}
    path = tmp / "space.yaml"
    path.write_text("# sdpo tune space.yaml\n" + yaml.safe_dump(space))
    lines: list[str] = []
    try:
        result = run_tune(str(path), output=str(tmp / "out"), log=lines.append)
    finally:
        ray.shutdown()
    return tmp / "out", result, "\n".join(lines)


@pytest.mark.timeout(900)
def test_three_trials_ran_at_once_and_all_completed(search):
    out, result, log = search
    assert "3 trial(s) at a time" in log, log
    assert len(result["rows"]) == 3 and "0 failed" in log, log


@pytest.mark.timeout(900)
def test_each_shared_entry_was_scored_once_and_holds_its_rows_once(search):
    out, _, _ = search
    statuses = [json.loads(p.read_text())["stages"][0]["cache"]["reference"]["status"]
                for p in sorted((out / "trials").glob("*/summary.json"))]
    assert sorted(statuses) == ["hit", "hit", "miss"], statuses  # one trial scored it, two waited for it
    entries = [d for d in (out / "cache" / "scores").iterdir() if d.is_dir()]
    assert len(entries) >= 2  # stage 1's reference pass and the base model's held-out pass (at least)
    for entry in entries:
        marker = json.loads((entry / "_COMPLETE.json").read_text())
        rows = pq.read_table(entry, columns=["content_key"]).column("content_key").to_pylist()
        assert len(rows) == marker["num_rows"] == len(set(rows)), entry  # no trial's files twice
    assert not list((out / "cache" / "scores").glob("*.lock"))  # every lease given back
    assert not list((out / "stage_store").glob("*.lock"))
