"""Every shipped job file parses against the schema and opens with the command that runs it."""

from pathlib import Path

import pytest

from sdpo.config import load_job

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_there_are_jobs():
    assert JOBS


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_validates(path):
    job = load_job(path)
    assert job.num_partitions() >= 1


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"jobs/{path.name}" in first and "sdpo " in first, first
