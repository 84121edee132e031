"""Benchmark: driver and worker memory when a partition grows 10× (the pipeline streams; it must stay flat).

The same tiny one-stage job runs on a partition of N distinct pairs and on one of FACTOR·N (default 10),
each in a fresh child process with its own local Ray instance, so every number is that run's own peak:

- driver     — the peak RSS of the process that calls `sdpo.pipeline.run` (`getrusage(RUSAGE_SELF)`),
               and its RSS once Ray is up and the imports are done ("setup"), so that growth with the
               data is visible apart from the fixed cost;
- train      — the training workers' peak RSS as they report it themselves (`peak_rss_mib` in the
               stage's metrics / summary.json, the largest over the ranks; worker.py `_peak_memory`);
- Ray procs  — every process of the child's Ray instance, sampled from /proc every 0.2 s (`VmHWM`, the
               kernel's own peak RSS of a process, so a short spike between samples still counts while
               the process lives): the largest train worker, inference actor (reference, gamma and
               held-out passes) and Ray Data task worker (ingest: read, tokenise, split, write), and
               Ray's own daemons (raylet, GCS, ...). RSS counts the object-store pages a process has
               touched: shared memory, so the columns do not add up.

Pairs are generated, all distinct (the text carries the pair's number), from the quickstart's words,
so both tokenizers read them: stories260K (`../shared/models/stories260K`, the default when present)
and the project's own offline model (`--model builtin`, `sdpo.assets`). Needs Ray (it measures the
pipeline). From the repository root:

    .venv/bin/python benchmarks/scale_memory.py                 # N = 400 and 4000 pairs: ~2 + ~4 min on 2 cores
    .venv/bin/python benchmarks/scale_memory.py --pairs 1000 --num-workers 2 --reference online

Results measured on a 2-core CPU are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import sdpo  # noqa: F401  (installed: pip install -e .)
except ModuleNotFoundError:
    sys.path.insert(0, str(REPO / "platform"))  # a checkout without the install

from sdpo.assets import GREETINGS, NAMES, NUMBERS, POLITE, RUDE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_pass import _positive, _shared  # noqa: E402  (the benchmarks' shared helpers)


def _stories() -> Path:
    return _shared("models/stories260K")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=_positive, default=400, help="N: pairs of the small partition (default 400)")
    p.add_argument("--factor", type=_positive, default=10, help="the large partition has FACTOR·N pairs (10)")
    p.add_argument("--model", default=None,
                   help="model path; 'builtin' for the offline quickstart model (default: stories260K if present)")
    p.add_argument("--num-workers", type=_positive, default=1)
    p.add_argument("--batch-size", type=_positive, default=16, help="pairs per worker per step (16)")
    p.add_argument("--reference", choices=("precompute", "online"), default="precompute")
    p.add_argument("--num-cpus", type=_positive, default=4, help="logical CPUs of each child's Ray (4)")
    p.add_argument("--object-store-mib", type=_positive, default=512)
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--child", type=_positive, default=None, help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Data and job
# --------------------------------------------------------------------------------------------------
def pair(i: int) -> dict:
    """Pair i: a greeting carrying i in base-40 number words, a polite (chosen) and a rude (rejected)
    reply; distinct for every i."""
    rng = random.Random(i)
    digits, n = [], i
    while True:
        digits.append(NUMBERS[n % len(NUMBERS)])
        n //= len(NUMBERS)
        if n == 0:
            break
    name = rng.choice(NAMES)
    prompt = rng.choice(GREETINGS).format(name=name) + " " + " ".join(digits)

    def reply(style) -> str:
        openers, bodies = style
        return f"{rng.choice(openers)} {name} , {rng.choice(bodies)} {rng.choice(bodies)}"

    return {"prompt": prompt, "chosen": reply(POLITE), "rejected": reply(RUDE)}


def write_pairs(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(pair(i)) + "\n")


def job_dict(args: argparse.Namespace, data: Path, out: Path) -> dict:
    model = args.model or str(_stories())
    if model == "builtin":
        model = "builtin:quickstart/model"
    return {
        "name": "scale-memory",
        "model": {"path": model},
        "data": {"sources": [{"name": "synthetic", "path": str(data)}], "max_length": 64, "max_prompt_length": 32},
        "training": {"learning_rate": 1e-4, "batch_size": args.batch_size, "logging_steps": 10**6},
        "scaling": {"num_workers": args.num_workers},
        "reference": {"mode": args.reference},
        "checkpointing": {"every_steps": None},
        "output_dir": str(out),
    }


# --------------------------------------------------------------------------------------------------
# Memory of the child's Ray processes
# --------------------------------------------------------------------------------------------------
def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class ProcessSampler(threading.Thread):
    """Every `interval` s: this process's descendants (its Ray instance: GCS, raylet, workers), each
    one's peak RSS (VmHWM), the titles it had (a pooled Ray worker is retitled per task), the title it
    had when its peak last rose (what drove it, to the sampling's resolution), and the largest private
    (RssAnon) and shared (RssShmem: object-store pages it touched) parts of its RSS seen."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peaks, self.titles, self.rose, self.anon, self.shmem = interval, {}, {}, {}, {}, {}
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.is_set():
            try:
                pids = [c.pid for c in me.children(recursive=True)]
            except psutil.Error:
                pids = []
            for pid in pids:
                hwm = _status_kib(pid, "VmHWM")
                if hwm is None:
                    continue
                title = _title(pid)
                if hwm > self.peaks.get(pid, 0):
                    self.peaks[pid], self.rose[pid] = hwm, title
                self.titles.setdefault(pid, set()).add(title)
                for field, seen in (("RssAnon", self.anon), ("RssShmem", self.shmem)):
                    seen[pid] = max(seen.get(pid, 0), _status_kib(pid, field) or 0)
            self._done.wait(self.interval)

    def finish(self) -> dict[str, dict]:
        """Per kind of process, its largest peak RSS (MiB) and that process's details."""
        self._done.set()
        self.join()
        out: dict[str, dict] = {}
        for pid, hwm in self.peaks.items():
            titles = " ".join(self.titles[pid])
            if "RayTrainWorker" in titles:
                kind = "train_worker"
            elif "PairScorer" in titles or "MapWorker" in titles:
                kind = "inference_actor"
            elif "ray::" in titles:
                kind = "data_task_worker"  # ingest and the other Ray Data tasks (and Train's controller)
            else:
                kind = "ray_daemons"
            if hwm / 1024 > out.get(kind, {}).get("peak_mib", 0.0):
                out[kind] = {"peak_mib": hwm / 1024, "peak_rose_as": self.rose[pid],
                             "max_anon_mib": self.anon[pid] / 1024, "max_shmem_mib": self.shmem[pid] / 1024}
        return out


# --------------------------------------------------------------------------------------------------
# One run (child process) and the comparison (parent)
# --------------------------------------------------------------------------------------------------
def _rss_mib() -> float:
    return (_status_kib(os.getpid(), "VmRSS") or 0) / 1024


def child(args: argparse.Namespace) -> dict:
    import ray
    from ray.data import DataContext

    from sdpo.config import parse_job
    from sdpo.pipeline import run

    n = args.child
    root = Path(args.workdir) / f"n{n}"
    root.mkdir(parents=True, exist_ok=True)
    data = root / "pairs.jsonl"
    write_pairs(data, n)
    job = parse_job(job_dict(args, data, root / "run"))
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="sdpo-scale-")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=args.object_store_mib << 20,
             _temp_dir=ray_tmp, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    sampler = ProcessSampler()
    sampler.start()
    setup_rss = _rss_mib()
    t0 = time.perf_counter()
    try:
        summary = run(job, overwrite=True, log=lambda line: None)
    finally:
        procs = sampler.finish()
        ray.shutdown()
    wall = time.perf_counter() - t0
    m = summary["stages"][0]["metrics"]
    return {
        "pairs": n, "partition_pairs": summary["stages"][0]["num_pairs"], "steps": m["steps"],
        "wall_s": wall, "train_s": m["train_seconds"],
        "driver_setup_mib": setup_rss,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_mib": m["peak_rss_mib"], "train_peak_by_rank_mib": m["peak_rss_mib_by_rank"],
        "cuda_max_allocated_mib": m.get("cuda_max_allocated_mib"),
        "procs": procs,
    }


def _child_run(args: argparse.Namespace, n: int, workdir: str) -> dict:
    result = Path(workdir) / f"result-{n}.json"
    cmd = [sys.executable, __file__, "--child", str(n), "--result", str(result), "--workdir", workdir,
           "--factor", str(args.factor), "--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size),
           "--reference", args.reference, "--num-cpus", str(args.num_cpus),
           "--object-store-mib", str(args.object_store_mib)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run with {n} pairs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(result.read_text())


def report(small: dict, large: dict) -> str:
    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.2f}" if a and b else "-"

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    rows = [
        ("driver, after setup", small["driver_setup_mib"], large["driver_setup_mib"]),
        ("driver, peak", small["driver_peak_mib"], large["driver_peak_mib"]),
        ("train worker, peak (own report)", small["train_peak_mib"], large["train_peak_mib"]),
        ("cuda max allocated", small["cuda_max_allocated_mib"], large["cuda_max_allocated_mib"]),
    ]
    kinds = ("train_worker", "inference_actor", "data_task_worker", "ray_daemons")
    for kind in kinds:
        a, b = (r["procs"].get(kind, {}) for r in (small, large))
        rows.append((f"{kind.replace('_', ' ')}, peak (VmHWM)", a.get("peak_mib"), b.get("peak_mib")))
        rows.append(("  of it private (max RssAnon)", a.get("max_anon_mib"), b.get("max_anon_mib")))
        rows.append(("  of it object store (max RssShmem)", a.get("max_shmem_mib"), b.get("max_shmem_mib")))
    head = (f"pairs: {small['pairs']} vs {large['pairs']} (partition {small['partition_pairs']} vs "
            f"{large['partition_pairs']}, steps {small['steps']} vs {large['steps']}; wall {small['wall_s']:.0f} s "
            f"vs {large['wall_s']:.0f} s, training {small['train_s']:.0f} s vs {large['train_s']:.0f} s)")
    lines = [head, "", f"| peak RSS, MiB | N = {small['pairs']} | {large['pairs'] // small['pairs']}N = {large['pairs']} | ratio |",
             "|---|---:|---:|---:|"]
    for name, a, b in rows:
        if a is None and b is None:
            continue
        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {ratio(a, b)} |")
    lines.append("")
    for kind in kinds:
        a, b = (r["procs"].get(kind, {}).get("peak_rose_as", "-") for r in (small, large))
        lines.append(f"{kind}: peak last rose as {a!r} / {b!r}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        Path(args.result).write_text(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="sdpo-scale-memory-") as tmp:
        workdir = args.workdir or tmp
        results = []
        for n in (args.pairs, args.pairs * args.factor):
            print(f"running {n} pairs ...", flush=True)
            results.append(_child_run(args, n, workdir))
            print(json.dumps(results[-1]), flush=True)
    print()
    print(report(*results))


if __name__ == "__main__":
    main()
