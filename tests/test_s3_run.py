"""A whole sDPO run on object storage: data read from a bucket, everything written to a bucket, against a
real S3-compatible server on loopback (moto in server mode, `s3_server` in conftest.py).

`sdpo run` runs as a subprocess that inherits the server's endpoint and credentials from the standard
AWS environment (what a user sets); the credentials are distinctive so the test can check that none of
them reaches a log, summary.json, the manifest or the report.
"""

import os
import subprocess
import sys
import time

import pytest
import yaml

from sdpo import storage

from .conftest import ORCA, STORIES, ULTRAFEEDBACK

pytestmark = pytest.mark.timeout(900)

SDPO = [sys.executable, "-m", "sdpo.cli"]
KEY_ID, SECRET = "AKIASDPOTESTKEY12345", "sdpoTestSecret/never+logged0123456789abcd"


@pytest.fixture(scope="module")
def env(s3_server):
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = KEY_ID, SECRET
    from .s3server import clear_fs_caches

    clear_fs_caches()
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def s3_run(s3_server, env, tmp_path_factory, shared):
    data = s3_server.make_bucket("sdpo-data")
    runs = s3_server.make_bucket("sdpo-runs")
    storage.write_text_atomic(f"{data}/orca/part-0.jsonl", "".join(ORCA.read_text().splitlines(True)[:50]))
    lines = ULTRAFEEDBACK.read_text().splitlines(True)
    storage.write_text_atomic(f"{data}/uf/part-0.jsonl", "".join(lines[:25]))
    storage.write_text_atomic(f"{data}/uf/part-1.jsonl", "".join(lines[25:50]))
    job = {
        "name": "s3run",
        "model": {"path": str(STORIES)},
        "data": {
            "sources": [{"name": "orca", "path": f"{data}/orca/part-0.jsonl"},
                        {"name": "uf", "path": f"{data}/uf/*.jsonl"}],
            "max_length": 96, "max_prompt_length": 48, "eval": {"fraction": 0.1},
        },
        "training": {"learning_rate": 1e-3, "batch_size": 4, "logging_steps": 100},
        "checkpointing": {"every_steps": 4},
        "output_dir": f"{runs}/run1",
    }
    path = tmp_path_factory.mktemp("s3job") / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    t0 = time.perf_counter()
    r = subprocess.run(SDPO + ["run", str(path)], capture_output=True, text=True, env=env, timeout=800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return {"out": f"{runs}/run1", "job": path, "result": r, "seconds": time.perf_counter() - t0}


def test_everything_lands_in_the_bucket(s3_run, tmp_path):
    out = s3_run["out"]
    summary = storage.read_json(f"{out}/summary.json")
    assert [s["partition"] for s in summary["stages"]] == ["orca", "uf"]
    s1, s2 = summary["stages"]
    assert s1["model"] == f"{out}/stages/1/model" and s2["reference"] == s1["model"]
    assert summary["final_model"] == f"{out}/stages/2/model"
    assert summary["data"]["rows"] == {"orca": 50, "uf": 50}
    for name in ("manifest.json", "report.md", "rejected_rows.jsonl", "stages/1/trainer_log.jsonl",
                 "stages/2/stage_metrics.json", "plots"):
        assert storage.exists(f"{out}/{name}"), name
    assert storage.listdir(f"{out}/cache/scores"), "reference passes are cached in the bucket"
    assert any(n.startswith("s3run-stage2-") for n in storage.listdir(f"{out}/ray")), "Ray Train storage"
    manifest = storage.read_json(f"{out}/manifest.json")
    assert sorted(manifest["stages"]) == ["1", "2"]
    assert manifest["stages"]["2"]["model_digest"] == s2["model_digest"]
    # the final model comes back from the bucket and loads through transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage.download_dir(summary["final_model"], str(tmp_path / "final"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    AutoTokenizer.from_pretrained(str(tmp_path / "final"))
    assert all(v == v for v in s2["metrics"].values() if isinstance(v, float)), "finite metrics"


def test_no_credential_reaches_logs_or_outputs(s3_run):
    out, r = s3_run["out"], s3_run["result"]
    texts = {"stdout": r.stdout, "stderr": r.stderr}
    for name in ("summary.json", "manifest.json", "report.md", "stages/2/stage_metrics.json"):
        texts[name] = storage.read_text(f"{out}/{name}")
    for name, text in texts.items():
        assert KEY_ID not in text and SECRET not in text, f"a credential appears in {name}"


def test_report_reads_an_s3_run_directory(s3_run, env):
    r = subprocess.run(SDPO + ["report", s3_run["out"]], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| 2 | uf |" in r.stdout.replace("  ", " ") or "uf" in r.stdout
    assert f"{s3_run['out']}/report.md" in r.stdout


def test_resume_on_s3_skips_completed_stages(s3_run, env):
    r = subprocess.run(SDPO + ["run", "--resume", s3_run["out"]], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 1/2: complete" in r.stdout and "stage 2/2: complete" in r.stdout
    assert "training on" not in r.stdout


def test_missing_bucket_fails_fast_naming_it(s3_run, env):
    t0 = time.perf_counter()
    r = subprocess.run(SDPO + ["run", str(s3_run["job"]), "--output", "s3://no-such-bucket-sdpo/run"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "no-such-bucket-sdpo" in r.stderr and "Traceback" not in r.stderr
    assert time.perf_counter() - t0 < 60  # no retry loop, no Ray started


def test_stage_model_on_s3_is_read_by_the_scorer(s3_run):
    """A stage model in the bucket is a valid reference for the next stage: the scorer downloads it."""
    import torch

    from sdpo.scoring import load_model

    model = load_model(f"{s3_run['out']}/stages/1/model", dtype=torch.float32, device=torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) > 0
