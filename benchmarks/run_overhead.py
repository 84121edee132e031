"""Benchmark: what a whole small run costs beyond its training steps — wall time, the Python processes
Ray starts, and each stage's data start-up — with sdpo's Ray settings and with Ray 2.60's defaults.

Tiny stages are all overhead: the quickstart trains 1,640 pairs in well under a second of steps, yet a
run took ~110 s on 2 cores. Most of it was process starts, each ~1 s of CPU (Python, Ray, pyarrow; ~4 s
with torch and transformers), and two Ray defaults caused most of those:

- Ray Data's V2 Parquet reader (2.60's default) starts a pool of 32 `FooterReader` actors for every
  `read_parquet` and kills them once the files are listed; sdpo reads a few Parquet folders per stage.
  sdpo sets `DataContext.use_datasource_v2 = False` (the V1 reader lists in reused task workers).
- Ray keeps `num_workers_soft_limit` worker processes (default: the CPU count) and kills idle ones above
  it. A stage's Train and Data actors hold workers while using no CPU, so every Ray Data execution found
  its task workers gone and started new ones. sdpo starts its local instances with CPUs + 8.

Each variant runs `sdpo run jobs/quickstart.yaml` (the project's own offline assets) in a fresh child
process with its own local Ray; this process polls /proc every 50 ms for the Ray worker processes the
child starts (Linux only; elsewhere the count is not shown). `--variant defaults` undoes the two settings
in the child (`sdpo.pipeline.local_ray_options` returns nothing, the V2 reader is switched back on).
From the repository root:

    .venv/bin/python benchmarks/run_overhead.py                     # sdpo's settings, then Ray's defaults: ~3.5 min
    .venv/bin/python benchmarks/run_overhead.py --variant sdpo --job jobs/quickstart.yaml

Results measured on a 2-core CPU are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The child: the CLI's own `run`, optionally with Ray's defaults put back first.
CHILD = textwrap.dedent("""
    import sys
    import sdpo.pipeline as pipeline
    if sys.argv[1] == "defaults":
        from ray.data import DataContext
        pipeline.local_ray_options = lambda num_cpus=None: {}
        _init = pipeline.init_ray
        def init_ray(address):
            _init(address)
            DataContext.get_current().use_datasource_v2 = True
        pipeline.init_ray = init_ray
    from sdpo.cli import main
    sys.exit(main(["run", sys.argv[2], "--output", sys.argv[3]]))
""")


def _new_ray_workers(seen: dict[str, str], before: set[str]) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in seen or pid in before:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone before it was read
        seen[pid] = cmd


def measure(variant: str, job: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc_fs = os.path.isdir("/proc/self")
    before = set(os.listdir("/proc")) if proc_fs else set()
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sdpo-overhead-") as out:
        log_path = Path(out, "run.log")  # a file, not a pipe: a run's log could fill a pipe nobody reads yet
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            child = subprocess.Popen([sys.executable, "-c", CHILD, variant, job, str(Path(out, "run"))], cwd=ROOT,
                                     env=env, stdout=log, stderr=subprocess.STDOUT)
            while child.poll() is None:
                if proc_fs:
                    _new_ray_workers(seen, before)
                time.sleep(0.05)
        wall = time.perf_counter() - t0
        if child.returncode != 0:
            sys.exit(f"{variant}: sdpo run failed ({child.returncode}):\n{log_path.read_text()[-4000:]}")
        summary = json.loads(Path(out, "run", "summary.json").read_text())
    workers = sum("default_worker.py" in cmd for cmd in seen.values())
    stages = [{"stage": s["index"], "wall_s": s["metrics"].get("wall_seconds"), "data_startup_s": s["metrics"].get("data_startup_s"),
               "pairs_per_s": s["metrics"].get("pairs_per_s"),
               "eval_ranking_accuracy": s["metrics"].get("eval/ranking_accuracy")}
              for s in summary["stages"]]
    return {"variant": variant, "wall_s": wall, "ray_workers": workers if proc_fs else None, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=["sdpo", "defaults", "both"], default="both")
    ap.add_argument("--job", default="jobs/quickstart.yaml")
    a = ap.parse_args(argv)
    variants = ["sdpo", "defaults"] if a.variant == "both" else [a.variant]
    results = [measure(v, a.job) for v in variants]
    print(f"{'settings':<10} {'wall s':>7} {'Ray workers started':>20}   per stage: wall s / data start-up s / "
          "pairs/s / held-out ranking acc")
    for r in results:
        stages = "; ".join(f"{s['wall_s']:.1f} / {s['data_startup_s']:.1f} / {s['pairs_per_s']:.0f} / "
                           f"{s['eval_ranking_accuracy']:.3f}" for s in r["stages"])
        workers = "n/a" if r["ray_workers"] is None else str(r["ray_workers"])
        print(f"{r['variant']:<10} {r['wall_s']:>7.1f} {workers:>20}   {stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
