"""`sdpo submit` and `sdpo jobs`: run jobs and Tune searches on a Ray cluster through its Job Submission API.

The job travels as a Ray runtime environment: the working directory (the project or wherever the
job file lives, build outputs and local runs left out) and the `sdpo` package itself, so the cluster
runs the submitter's code. Everything that can be checked here is, before anything is uploaded: the
job file (a Tune space's base job too) parses with its overrides, it and its relative data paths sit
inside the working directory, and its output is a place
the cluster can write and the submitter can read back (object storage, or an absolute path on
shared storage) — not a relative path that would land in the job's temporary working copy.

Building the submission (`build_submission`) is pure; the client calls are thin wrappers over
`ray.job_submission.JobSubmissionClient`.
"""

from __future__ import annotations

import glob
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo import storage
from sdpo.config import ConfigError, JobConfig, load_job, load_yaml, parse_job

# Not shipped with a job: environments, VCS data, caches, local runs and model weights (jobs read
# models from the hub or object storage; Ray caps a working directory at 100 MiB anyway).
EXCLUDES = [".git", ".venv", "venv", ".env", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
            ".mypy_cache", "*.egg-info", "build", "dist", "node_modules", "*.safetensors", "*.bin", "*.pt",
            "*.ckpt", "wandb"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    output: str | None  # where the run writes (None for a Tune search: its space decides)


def _inside(path: Path, root: Path, what: str = "the job file") -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ConfigError(
            f"{path} is outside the working directory {root}: {what} travels with the working "
            "directory, so run `sdpo submit` from a directory that contains it, or pass --working-dir"
        ) from None


def check_data_paths(job: JobConfig, root: Path, origin: str) -> None:
    """On the cluster a relative data path is read from the job's copy of the working directory (its
    cwd): it must lie inside the working directory and match a file there. Absolute paths (shared
    storage), URLs and built-in assets are the cluster's own business."""
    for src in job.data.sources:
        for pattern in src.paths:
            if not storage.is_local(pattern) or os.path.isabs(pattern) or pattern.startswith("builtin:"):
                continue
            what = f"{origin}: data.sources[{src.name}].path {pattern!r}"
            if not os.path.normpath(root.resolve() / pattern).startswith(str(root.resolve()) + os.sep):
                raise ConfigError(f"{what} is outside the working directory {root}, where the cluster reads a relative "
                                  "path (its copy of the working directory is its cwd); move the data inside it, "
                                  "pass --working-dir, or use s3://")
            if not glob.glob(str(root / pattern), recursive=True):
                raise ConfigError(f"{what} matches no file in the working directory {root}, where the cluster "
                                  "reads a relative path; give it relative to the working directory, or use s3://")


def check_output(output: str) -> None:
    """A job's output must outlive the job's temporary working copy and be reachable from every node."""
    if storage.is_local(output) and not os.path.isabs(output):
        raise ConfigError(
            f"output {output!r} is a relative path: on the cluster it would land in the job's temporary working "
            "directory and be deleted with it; pass --output s3://bucket/run (or an absolute path on storage "
            "every node mounts, with scaling.shared_filesystem: true)"
        )


def build_submission(target: str, *, tune: bool = False, overrides: list[str] = (), output: str | None = None,
                     working_dir: str = ".", python: str = "python") -> Submission:
    """Validate a job (or a Tune space) here and describe its submission: entrypoint and runtime env."""
    import sdpo

    root, path = Path(working_dir), Path(target)
    if not path.exists():
        raise ConfigError(f"{target}: no such file")
    rel = _inside(path, root)
    if tune:
        from sdpo.tuning import load_space

        if overrides:
            raise ConfigError("--set applies to job files; put search settings in the space file")
        space = load_space(str(path))  # every point of the space validated here, not on the cluster
        base = load_yaml(path.read_text()).get("job")
        if isinstance(base, str):  # read on the cluster relative to the space file, in the working copy
            _inside(path.parent / base, root, f"{target}'s base job (job: {base})")
        check_data_paths(parse_job(space.base_job, origin=target), root, f"{target}'s base job")
        if not output:
            raise ConfigError("sdpo submit --tune needs --output (s3://bucket/experiment): the space's default "
                              "output is a relative path, which would vanish with the job's working copy")
        check_output(output)
        args, out = ["tune", rel, "--output", output], output
    else:
        job = load_job(str(path), list(overrides))
        check_data_paths(job, root, target)
        out = output or job.output_dir
        check_output(out)
        args = ["run", rel, "--output", out]
        for item in overrides:
            args += ["--set", item]
    runtime_env = {
        "working_dir": str(root.resolve()),
        "excludes": list(EXCLUDES),
        "py_modules": [os.path.dirname(sdpo.__file__)],
        "env_vars": {"PYTHONUNBUFFERED": "1", "SDPO_SHIPPED": "1"},
    }
    return Submission(shlex.join([python, "-m", "sdpo.cli", *args]), runtime_env, out)


# --------------------------------------------------------------------------------------------------
# The cluster's Job Submission API
# --------------------------------------------------------------------------------------------------
def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {str(err).splitlines()[0]}; is the head "
                          "running and its dashboard port (8265) reachable?") from None


def submit(address: str | None, sub: Submission, submission_id: str | None = None, *, patience: float = 180) -> str:
    """Submit; a cluster that has just started answers "no available agent" until its job agents are
    up (seconds to minutes on a busy head): that one answer is retried, with backoff, for `patience` seconds."""
    c, deadline, wait = client(address), time.time() + patience, 1.0
    while True:
        try:
            return c.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, submission_id=submission_id)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() + wait > deadline:
                raise
            print(f"the cluster's job agent is not up yet; retrying in {wait:g}s", file=sys.stderr)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)


def follow(address: str | None, job_id: str, *, poll: float = 1.0, out=sys.stdout) -> str:
    """Stream the job's logs as they come (the dashboard's log tail: each line sent once, not the whole
    log re-fetched every poll) until it ends; return its final status."""
    import asyncio

    c = client(address)

    async def stream() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    while (status := str(c.get_job_status(job_id).value)) not in TERMINAL:  # the tail ends as the job does
        time.sleep(poll)
    return status


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    rows = []
    for info in client(address).list_jobs():
        rows.append({"id": info.submission_id or info.job_id, "status": str(info.status.value),
                     "start": info.start_time, "entrypoint": info.entrypoint, "message": info.message or ""})
    return sorted(rows, key=lambda r: r["start"] or 0)


def format_jobs(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'id':<28}{'status':<11}{'started (UTC)':<21}entrypoint"]
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["start"] / 1000)) if r["start"] else "-"
        entry = r["entrypoint"].replace("python -m sdpo.cli ", "sdpo ")
        lines.append(f"{r['id']:<28}{r['status']:<11}{started:<21}{entry[:80]}")
    return "\n".join(lines)
