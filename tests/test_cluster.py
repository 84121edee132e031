"""`sdpo submit` and `sdpo jobs` against a real Ray cluster on loopback: a head node and a second worker
node started with `ray start` (two Ray nodes on this machine), jobs submitted through the Job
Submission API. The cluster is torn down even when a test fails: every process carrying its own
temporary directory is killed, and nothing else (other Ray instances on the machine are left alone)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDPO = [sys.executable, "-m", "sdpo.cli"]
BIN = str(Path(sys.executable).parent)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
ENV.pop("RAY_ADDRESS", None)
# the quickstart without its diagnostics passes (gamma, held-out): the cluster path, not the metrics
QUICK = ["--set", "reference.gamma=false", "--set", "data.eval.fraction=0", "--set", "scaling.shared_filesystem=true"]

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return pids


def _kill_tree_of(marker: str) -> None:
    """Kill every process whose command line names this cluster's temporary directory (Ray's GCS, raylets,
    dashboard, workers, job supervisors all carry it); other Ray instances on the machine are left alone."""
    for _ in range(5):
        pids = _processes_naming(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def _ray(args, env) -> None:
    r = subprocess.run([f"{BIN}/ray", *args], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _wait_until_jobs_run(address: str) -> None:
    """A fresh cluster refuses submissions until its job agents are up; a no-op job proves they are,
    so the tests below time their own jobs, not the cluster's start."""
    from sdpo.submit import Submission, client, submit

    submit(address, Submission("python -c pass", {}, None), "sdpo-warmup", patience=300)
    c, deadline = client(address), time.time() + 300
    while str(c.get_job_status("sdpo-warmup").value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, "the cluster did not run a no-op job in 300 s"
        time.sleep(1)
    assert str(c.get_job_status("sdpo-warmup").value) == "SUCCEEDED", c.get_job_logs("sdpo-warmup")


@pytest.fixture(scope="module")
def cluster(shared):
    temp = tempfile.mkdtemp(prefix="sdpo-rc-")  # short: Ray's socket paths must stay under 108 bytes
    port, dash = _free_port(), _free_port()
    env = ENV | {"RAY_ADDRESS": ""}
    common = ["--disable-usage-stats", "--num-cpus=2", "--object-store-memory=200000000"]

    def own_ports():  # two nodes on one machine (and any other Ray here) must not share their agents' ports
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    try:
        _ray(["start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
              f"--temp-dir={temp}", "--include-dashboard=true", *common, *own_ports()], env)
        _ray(["start", f"--address=127.0.0.1:{port}", *common, *own_ports()], env)
        address = f"http://127.0.0.1:{dash}"
        _wait_until_jobs_run(address)
        yield {"address": address, "env": ENV | {"RAY_ADDRESS": address}, "gcs": f"127.0.0.1:{port}"}
    finally:
        _kill_tree_of(temp)


def sdpo(args, cluster, timeout=120, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(SDPO + args, capture_output=True, text=True, env=cluster["env"], timeout=timeout, cwd=cwd)


def _status(cluster, job_id) -> str:
    r = sdpo(["jobs", "status", job_id], cluster)
    assert r.returncode == 0, r.stderr
    return r.stdout.split(":", 1)[1].split()[0]


def _wait_for(cluster, job_id, wanted: set[str], timeout=300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _status(cluster, job_id)
        if status in wanted:
            return status
        time.sleep(2)
    raise AssertionError(f"{job_id} did not reach {wanted}; last status {status}")


def test_two_nodes_are_up(cluster):
    import ray

    ray.init(address=cluster["gcs"], log_to_driver=False)
    try:
        assert sum(1 for n in ray.nodes() if n["Alive"]) == 2
    finally:
        ray.shutdown()


def test_submit_wait_runs_the_quickstart(cluster, tmp_path):
    out = tmp_path / "run"
    r = sdpo(["submit", "jobs/quickstart.yaml", "--output", str(out), "--wait", "--submission-id", "sdpo-quick",
              *QUICK], cluster, timeout=540)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "submitted sdpo-quick" in r.stdout and "job sdpo-quick: SUCCEEDED" in r.stdout
    assert "stage 2 done" in r.stdout  # the job's own log, streamed by --wait
    summary = json.loads((out / "summary.json").read_text())
    assert [s["index"] for s in summary["stages"]] == [1, 2]
    final = Path(summary["final_model"])
    assert final == out / "stages" / "2" / "model"

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).num_parameters() > 0

    assert _status(cluster, "sdpo-quick") == "SUCCEEDED"
    logs = sdpo(["jobs", "logs", "sdpo-quick"], cluster)
    assert logs.returncode == 0 and f"final model: {final}" in logs.stdout
    listing = sdpo(["jobs", "list"], cluster)
    assert "sdpo-quick" in listing.stdout and "SUCCEEDED" in listing.stdout
    assert "sdpo run jobs/quickstart.yaml" in listing.stdout


def test_stop_a_running_job(cluster, tmp_path):
    r = sdpo(["submit", "jobs/quickstart.yaml", "--output", str(tmp_path / "run"), "--submission-id", "sdpo-stop",
              *QUICK], cluster)
    assert r.returncode == 0, r.stderr
    _wait_for(cluster, "sdpo-stop", {"RUNNING"}, timeout=120)
    stop = sdpo(["jobs", "stop", "sdpo-stop"], cluster)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    assert _wait_for(cluster, "sdpo-stop", {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) == "STOPPED"
    assert not (tmp_path / "run" / "summary.json").exists()


def test_local_output_on_two_nodes_fails_fast_on_the_cluster(cluster, tmp_path):
    """Without shared_filesystem the run refuses a local output on a 2-node cluster, before ingest."""
    r = sdpo(["submit", "jobs/quickstart.yaml", "--output", str(tmp_path / "run"), "--submission-id", "sdpo-local"],
             cluster)
    assert r.returncode == 0, r.stderr
    assert _wait_for(cluster, "sdpo-local", {"FAILED", "SUCCEEDED", "STOPPED"}, timeout=240) == "FAILED"
    logs = sdpo(["jobs", "logs", "sdpo-local"], cluster).stdout
    assert "the Ray cluster has 2 nodes" in logs and "shared_filesystem" in logs


def test_bad_job_never_reaches_the_cluster(cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "jobs" / "quickstart.yaml").read_text().replace("epochs: 1", "epochs: 0"))
    before = sdpo(["jobs", "list"], cluster).stdout.count("\n")
    r = sdpo(["submit", str(bad), "--output", str(tmp_path / "run"), "--working-dir", str(tmp_path)], cluster)
    assert r.returncode == 2 and "training.epochs" in r.stderr
    r = sdpo(["submit", "jobs/quickstart.yaml"], cluster)  # relative output_dir: refused, says what to do
    assert r.returncode == 2 and "relative path" in r.stderr and "s3://" in r.stderr
    assert sdpo(["jobs", "list"], cluster).stdout.count("\n") == before
    unknown = sdpo(["jobs", "status", "no-such-job"], cluster)
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr


def test_submit_tune_runs_a_search_on_the_cluster(cluster, tmp_path):
    """`sdpo submit --tune` with the space given relative to the working directory: its trials run in
    their own directories, possibly on the other node, so they get the parsed space, not its path (a
    relative path failed every trial here before, and the job still said SUCCEEDED)."""
    import yaml

    job = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    job["data"]["sources"] = [{"name": "easy", "path": "builtin:quickstart/easy", "max_rows": 120}]
    job["data"]["eval"] = {"fraction": 0.1}
    job["reference"] = {"mode": "online", "gamma": False}
    job["scaling"]["shared_filesystem"] = True
    space = {"name": "one", "job": job, "search": {"training.learning_rate": {"grid": [0.001]}},
             "searcher": "grid", "scheduler": {"type": "fifo"}, "metric": "eval/reward_accuracy", "mode": "max"}
    (tmp_path / "space.yaml").write_text("# sdpo tune space.yaml\n" + yaml.safe_dump(space))
    out = tmp_path / "out"
    r = sdpo(["submit", "--tune", "space.yaml", "--output", str(out), "--wait", "--submission-id", "sdpo-tune"],
             cluster, timeout=540, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "job sdpo-tune: SUCCEEDED" in r.stdout and "1 trials, 0 pruned, 0 failed;" in r.stdout
    # (our own failure lines; a Ray worker may abort and be retried with a "... failed: ..." of its own)
    assert not re.search(r"trial \w+ failed: ", r.stdout)
    assert (out / "best_job.yaml").exists() and (out / "results.csv").exists()
