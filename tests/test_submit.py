"""What `sdpo submit` sends, checked without a cluster: entrypoint, runtime env, and the refusals that
happen before anything is uploaded."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdpo.config import ConfigError
from sdpo.submit import EXCLUDES, build_submission

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def test_job_submission_carries_the_job_its_overrides_and_the_package():
    sub = build_submission(str(QUICKSTART), overrides=["training.learning_rate=0.002"], output="s3://b/run",
                           working_dir=str(ROOT))
    assert shlex.split(sub.entrypoint) == ["python", "-m", "sdpo.cli", "run", "jobs/quickstart.yaml",
                                           "--output", "s3://b/run", "--set", "training.learning_rate=0.002"]
    env = sub.runtime_env
    assert env["working_dir"] == str(ROOT)
    assert env["py_modules"] == [str(ROOT / "platform" / "sdpo")]
    assert env["env_vars"]["SDPO_SHIPPED"] == "1"  # the driver then does not ship the package a second time
    assert {".git", ".venv", "runs", "*.safetensors"} <= set(env["excludes"]) == set(EXCLUDES)
    assert sub.output == "s3://b/run"


def test_job_output_defaults_to_the_jobs_and_must_survive_the_job(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(QUICKSTART.read_text().replace("output_dir: runs/quickstart", f"output_dir: {tmp_path}/out"))
    assert build_submission(str(job), working_dir=str(tmp_path)).output == f"{tmp_path}/out"
    with pytest.raises(ConfigError, match="'runs/quickstart' is a relative path.*s3://"):
        build_submission(str(QUICKSTART), working_dir=str(ROOT))


def test_a_job_outside_the_working_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="outside the working directory.*--working-dir"):
        build_submission(str(QUICKSTART), output="s3://b/r", working_dir=str(tmp_path))


def test_a_bad_job_is_refused_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("learning_rate: 1.0e-3", "learnig_rate: 1.0e-3"))
    with pytest.raises(ConfigError, match="learnig_rate"):
        build_submission(str(bad), output="s3://b/r", working_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="epochs"):
        build_submission(str(QUICKSTART), overrides=["training.epochs=0"], output="s3://b/r", working_dir=str(ROOT))


def test_tune_submission_validates_the_space_and_needs_an_output():
    space = ROOT / "tune_spaces" / "orderings.yaml"
    sub = build_submission(str(space), tune=True, output="s3://b/tune", working_dir=str(ROOT))
    assert shlex.split(sub.entrypoint)[3:] == ["tune", "tune_spaces/orderings.yaml", "--output", "s3://b/tune"]
    with pytest.raises(ConfigError, match="needs --output"):
        build_submission(str(space), tune=True, working_dir=str(ROOT))


def test_a_tune_space_whose_base_job_is_outside_the_working_directory_is_refused():
    """The space travels, but its `job: ../jobs/quickstart.yaml` would not: refused before any upload."""
    space = ROOT / "tune_spaces" / "orderings.yaml"
    with pytest.raises(ConfigError, match=r"outside the working directory .*base job \(job: \.\./jobs/quickstart"):
        build_submission(str(space), tune=True, output="s3://b/tune", working_dir=str(ROOT / "tune_spaces"))


def _data_job(tmp_path: Path, path: str) -> Path:
    text = QUICKSTART.read_text().replace("builtin:quickstart/easy", path)
    job = tmp_path / "w" / "job.yaml"
    job.parent.mkdir(exist_ok=True)
    job.write_text(text)
    return job


def test_relative_data_paths_must_travel_with_the_working_directory(tmp_path):
    """On the cluster a relative data path is read from the working copy: outside it, or not there, refused."""
    job = _data_job(tmp_path, "../easy.jsonl")
    with pytest.raises(ConfigError, match=r"data\.sources\[easy\]\.path '\.\./easy\.jsonl'.*outside the working"):
        build_submission(str(job), output="s3://b/r", working_dir=str(tmp_path / "w"))
    job = _data_job(tmp_path, "data/easy-*.jsonl")
    with pytest.raises(ConfigError, match=r"'data/easy-\*\.jsonl' matches no file in the working directory"):
        build_submission(str(job), output="s3://b/r", working_dir=str(tmp_path / "w"))
    (tmp_path / "w" / "data").mkdir()
    (tmp_path / "w" / "data" / "easy-0.jsonl").write_text("{}\n")
    assert build_submission(str(job), output="s3://b/r", working_dir=str(tmp_path / "w")).output == "s3://b/r"
    for fine in ("s3://b/easy.jsonl", str(tmp_path / "elsewhere.jsonl")):  # object storage, shared storage
        build_submission(str(_data_job(tmp_path, fine)), output="s3://b/r", working_dir=str(tmp_path / "w"))


def test_a_tune_spaces_base_job_data_paths_are_checked(tmp_path):
    (tmp_path / "w").mkdir()
    space = tmp_path / "w" / "space.yaml"
    job = yaml.safe_load(QUICKSTART.read_text())
    job["data"]["sources"][0]["path"] = "../easy.jsonl"
    space.write_text(yaml.safe_dump({"name": "s", "job": job, "search": {"loss.beta": {"choice": [0.1, 0.2]}}}))
    with pytest.raises(ConfigError, match=r"space\.yaml's base job: data\.sources\[easy\]\.path"):
        build_submission(str(space), tune=True, output="s3://b/t", working_dir=str(tmp_path / "w"))


def test_cli_without_an_address_says_how_to_give_one():
    env = {"PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "sdpo.cli", "jobs", "list"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "--address http://HEAD:8265" in r.stderr and "RAY_ADDRESS" in r.stderr
