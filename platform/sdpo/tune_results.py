"""The experiment around the trials of `sdpo tune`: how many trials run at once (`plan_trials`), and
what they produced: the ranked trial table (results.csv, results.md), the metric after each stage
of every trial (a PNG) and the best trial's job (best_job.yaml). Pure Python and matplotlib, no Ray.

Each trial comes in as a plain dict, whatever Tune's result objects looked like:
    {"trial": name, "config": {search key: value}, "pruned": bool, "status": "TERMINATED" | "ERROR" | ...,
     "stages": [{"index": 1, "partition": "easy", "metrics": {...}, "reused": bool}, ...]}
Trials are ranked by the metric of their last stage (a pruned trial's last stage is where ASHA stopped
it), best first for the space's mode; a trial without that value ranks last.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from sdpo import storage
from sdpo.config import JobConfig, dump_job
from sdpo.plan import PlanError, plan_resources, plan_scoring
from sdpo.report import png_bytes, write_bytes
from sdpo.tuning import PARTITION_ORDER, TuneSpace, trial_job

MISSING = "–"


# --------------------------------------------------------------------------------------------------
# Resources of concurrent trials
# --------------------------------------------------------------------------------------------------
DRIVER_CPUS = 0.1  # the trial driver: a Tune function actor that only starts stages and reports


@dataclass(frozen=True)
class TrialNeeds:
    """What one trial's job asks of the cluster: its `scaling` and `reference` settings, which a trial
    plans as `sdpo run` does (`plan.plan_resources` for a stage's workers, `plan.plan_scoring` for the
    inference passes' actors)."""

    num_workers: int
    use_gpu: bool
    data_cpus: float = 1.0
    resources_per_worker: dict[str, float] | None = None
    num_actors: int | None = None
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float | None = None

    @classmethod
    def of(cls, job: JobConfig) -> TrialNeeds:
        s, r = job.scaling, job.reference
        return cls(s.num_workers, s.use_gpu, s.data_cpus, dict(s.resources_per_worker or {}) or None,
                   r.num_actors, r.num_gpus_per_actor, r.num_cpus_per_actor)

    def training(self) -> tuple[float, float]:
        """(CPUs, GPUs) while a stage trains: its workers (1 CPU each unless resources_per_worker says,
        1 GPU each with use_gpu) and the CPUs kept for Ray Data."""
        per = dict(self.resources_per_worker) if self.resources_per_worker is not None else {"CPU": 1.0}
        if self.use_gpu:
            per.setdefault("GPU", 1.0)
        return per.get("CPU", 0.0) * self.num_workers + self.data_cpus, per.get("GPU", 0.0) * self.num_workers

    def inference(self) -> tuple[float, float]:
        """(CPUs, GPUs) while an inference pass runs: its actors (num_actors, at least one; 1 CPU each unless
        num_cpus_per_actor says) and at least 1 CPU for Ray Data, as `plan_scoring` keeps."""
        gpu_each = self.num_gpus_per_actor if self.num_gpus_per_actor is not None else float(self.use_gpu)
        actors = self.num_actors or 1
        return actors * (self.num_cpus_per_actor or 1.0) + max(self.data_cpus, 1.0), actors * gpu_each

    def peak(self) -> dict[str, float]:
        """The most a trial holds at once, driver included: its stages and inference passes take turns."""
        (train_cpu, train_gpu), (infer_cpu, infer_gpu) = self.training(), self.inference()
        gpus = max(train_gpu, infer_gpu)
        return {"CPU": DRIVER_CPUS + max(train_cpu, infer_cpu)} | ({"GPU": gpus} if gpus > 0 else {})

    def check(self, share: dict[str, float]) -> None:
        """Raise PlanError unless a trial's own plans (`sdpo run`'s) accept `share`."""
        plan_resources(share, num_workers=self.num_workers, use_gpu=self.use_gpu, data_cpus=self.data_cpus,
                       resources_per_worker=self.resources_per_worker)
        plan_scoring(share, use_gpu=self.use_gpu, data_cpus=self.data_cpus, num_actors=self.num_actors,
                     num_gpus_per_actor=self.num_gpus_per_actor, num_cpus_per_actor=self.num_cpus_per_actor)

    def describe(self, key: str) -> str:
        (train_cpu, train_gpu), (infer_cpu, infer_gpu) = self.training(), self.inference()
        if key == "GPU":
            return f"{train_gpu:g} for {self.num_workers} worker(s) while a stage trains, {infer_gpu:g} for the inference actor(s)"
        return (f"{DRIVER_CPUS:g} trial driver + the larger of {train_cpu:g} while a stage trains ({self.num_workers} "
                f"worker(s) and {self.data_cpus:g} kept for Ray Data) and {infer_cpu:g} while an inference pass runs")


@dataclass(frozen=True)
class TrialPlan:
    concurrent: int
    trial_cluster: dict[str, float]  # one trial's share, less its driver: give it to plan_resources/plan_scoring
    driver_cpus: float  # tune.with_resources(driver, {"CPU": driver_cpus})
    per_trial: dict[str, float]  # the most one trial holds at once, driver included


def _most(needs: list[TrialNeeds]) -> dict[str, float]:
    peaks = [n.peak() for n in needs]
    return {k: max(p.get(k, 0.0) for p in peaks) for k in ("CPU", "GPU") if any(k in p for p in peaks)}


def autoscaled_trials(cluster: dict[str, float], needs: TrialNeeds | Sequence[TrialNeeds],
                      max_concurrent: int | None = None) -> dict[str, float]:
    """The cluster as the autoscaler will make it for the search (scaling.autoscale), as `plan.autoscaled_view`
    is for one run: what is up now, raised to what max_concurrent_trials trials (default 1) hold at once."""
    most = _most([needs] if isinstance(needs, TrialNeeds) else list(needs))
    view = dict(cluster)
    for key, each in most.items():
        view[key] = max(view.get(key, 0.0), each * (max_concurrent or 1))
    return view


def plan_trials(cluster: dict[str, float], needs: TrialNeeds | Sequence[TrialNeeds], *,
                max_concurrent: int | None = None) -> TrialPlan:
    """How many trials run at once, and the share of the cluster each may assume.

    A trial holds its driver (DRIVER_CPUS) throughout and, in turn, a stage's workers (with the CPUs kept
    for Ray Data) or an inference pass's actors (`TrialNeeds.peak`): as in `sdpo run`, the passes run
    between stages, never beside them. Every trial gets the same share, sized for the most demanding of
    `needs` (one per distinct scaling/reference setting the space searches): CPUs shared out evenly (the
    spare ones speed the CPU inference pass), GPUs exactly what that trial needs. The share is then
    checked with the trials' own plans, so a trial never fails (or waits forever) later for its share.
    """
    needs = [needs] if isinstance(needs, TrialNeeds) else list(needs)
    if max_concurrent is not None and max_concurrent < 1:
        raise PlanError(f"max_concurrent_trials must be at least 1, got {max_concurrent}")
    most = _most(needs)
    for key, need in most.items():
        have = cluster.get(key, 0.0)
        if need > have + 1e-9:
            worst = max(needs, key=lambda n: n.peak().get(key, 0.0))
            fix = ("lower scaling.num_workers or reference.num_actors/num_gpus_per_actor, or set scaling.use_gpu=false"
                   if key == "GPU" else "lower scaling.num_workers, scaling.resources_per_worker.CPU or scaling.data_cpus, "
                   "or give Ray more logical CPUs (ray.init(num_cpus=...))")
            raise PlanError(f"a trial needs {need:g} {key}s ({worst.describe(key)}); the cluster has {have:g}; {fix}")
    fits = min(int((cluster.get(k, 0.0) + 1e-9) // need) for k, need in most.items())
    for concurrent in range(min(fits, max_concurrent or fits), 0, -1):
        share = {"CPU": math.floor((cluster.get("CPU", 0.0) / concurrent - DRIVER_CPUS) * 100 + 1e-6) / 100}
        if "GPU" in most:
            share["GPU"] = most["GPU"]
        try:  # the per-trial plans must accept the share, or the trial would fail (or wait forever) later
            for n in needs:
                n.check(share)
        except PlanError as err:
            if concurrent == 1:
                raise PlanError(f"one trial's share of the cluster {share} does not run: {err}") from None
            continue
        return TrialPlan(concurrent, share, DRIVER_CPUS, most)
    raise AssertionError("unreachable: the loop returns or raises at concurrent == 1")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A finite metric value, or None (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _stages(trial: dict) -> list[dict]:
    return sorted(trial.get("stages") or [], key=lambda s: s.get("index", 0))


def metric_series(trial: dict, metric: str) -> dict[int, float | None]:
    """Stage index -> the trial's metric after that stage."""
    return {s["index"]: _number((s.get("metrics") or {}).get(metric)) for s in _stages(trial)}


def order_label(trial: dict) -> str:
    """`easy→hard`: the searched partition order, else the partitions the stages trained on."""
    order = (trial.get("config") or {}).get(PARTITION_ORDER)
    if isinstance(order, str):  # optuna's encoding
        order = order.split(",")
    if not isinstance(order, list):
        order = [str(s.get("partition")) for s in _stages(trial)]
    return "→".join(map(str, order))


def results_table(trials: list[dict], metric: str, mode: str) -> tuple[list[dict], str]:
    """One row per trial, best first: rank, trial, order, stages, the searched values, the final and best
    metric, the metric after each stage (`<metric>@<i>`), reused stages, pruned, status."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("config") or {}) if k != PARTITION_ORDER))
    most = max((i for t in trials for i in metric_series(t, metric)), default=0)
    rows = []
    for t in trials:
        series = metric_series(t, metric)
        values = [v for v in series.values() if v is not None]
        final = series[max(series)] if series else None
        rows.append({
            "trial": t.get("trial"),
            "order": order_label(t),
            "stages": len(series),
            **{k: (t.get("config") or {}).get(k) for k in keys},
            "final": final,
            "best": (max if mode == "max" else min)(values) if values else None,
            **{f"{metric}@{i}": series.get(i) for i in range(1, most + 1)},
            "reused": sum(bool(s.get("reused")) for s in _stages(t)),
            "pruned": bool(t.get("pruned")),
            "status": t.get("status"),
        })
    rows.sort(key=lambda r: (r["final"] is None, sign * (r["final"] or 0.0), str(r["trial"])))
    rows = [{"rank": n, **r} for n, r in enumerate(rows, 1)]
    note = (f"Trials ranked by `{metric}` after their last stage ({mode}imised); `best` is the best stage's value. "
            "Pruned trials were stopped early by the scheduler.\n\n")
    return rows, note + rows_markdown(rows)


def _cell(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def rows_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)\n"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(h)).replace("|", "\\|") for h in headers) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if rows:
        writer.writerow(list(rows[0]))
    for r in rows:
        writer.writerow(["" if v is None else _cell(v) if isinstance(v, bool | list | dict) else v for v in r.values()])
    return buf.getvalue()


def write_results(out_dir: str, rows: list[dict], markdown: str | None = None) -> tuple[str, str]:
    """`results.csv` and `results.md` under out_dir (local or any fsspec URL); returns their paths."""
    csv_path, md_path = storage.join(out_dir, "results.csv"), storage.join(out_dir, "results.md")
    storage.write_text_atomic(csv_path, rows_csv(rows))
    storage.write_text_atomic(md_path, markdown if markdown is not None else rows_markdown(rows))
    return csv_path, md_path


def plot_metric(out_path: str, trials: list[dict], metric: str) -> str:
    """The metric after each stage, one line per trial; pruned trials dashed."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for n, t in enumerate(trials):
        points = [(i, v) for i, v in metric_series(t, metric).items() if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", color=f"C{n % 10}", linestyle="--" if t.get("pruned") else "-",
                label=f"{t.get('trial')}{' (pruned)' if t.get('pruned') else ''}")
        drawn += 1
    if drawn:
        ax.legend(fontsize=7, loc="best", ncol=1 if drawn <= 12 else 2)
    else:
        ax.text(0.5, 0.5, f"no trial reported {metric}", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("stage")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per stage")
    write_bytes(out_path, png_bytes(fig))
    return out_path


# --------------------------------------------------------------------------------------------------
# best_job.yaml
# --------------------------------------------------------------------------------------------------
def best_job_yaml(space: TuneSpace, best_config: dict, *, trial_id: str | None = None,
                  value: float | None = None) -> str:
    """The best trial's whole job, runnable on its own; it writes to `<base output_dir>/<space>-best`."""
    job = trial_job(space, best_config, trial_id)
    base_out = space.base_job.get("output_dir") or JobConfig.model_fields["output_dir"].default
    job = job.model_copy(update={"output_dir": storage.join(base_out, f"{space.name}-best")})
    shown = "n/a" if value is None else f"{value:.6g}"
    return (f"# sdpo run best_job.yaml  (best trial {job.name} of tune experiment {space.name}: "
            f"{space.metric}={shown})\n" + dump_job(job))
