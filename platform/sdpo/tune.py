"""`sdpo tune SPACE.yaml`: Ray Tune searches the data schedule of sDPO.

One trial is one sDPO job (`tuning.trial_job`): a Tune *function* trainable — the trial's driver —
runs the job's stage `TorchTrainer`s in sequence through `pipeline.run` and reports once per stage, so
one Tune iteration is one stage and ASHA prunes at stage boundaries (Train V2's pattern; never
`Tuner(trainer)`). How many trials run at once, and which share of the cluster each may assume, is the
pure `tune_results.plan_trials`, which always leaves CPUs for Ray Data (a trial whose workers take every
CPU waits forever for its data) and refuses infeasible requests before any trial starts.

Trials whose first stages are identical share them: every stage goes through a content-addressed
`StageStore` (`<output>/stage_store`), keyed by the stage's inputs (base model, partition content,
settings, and the digests of its reference and init — i.e. the whole chain before it). The first trial
to need a stage trains and publishes it; the others reuse its model, step log and metrics (and the
reference and held-out passes, through the shared `<output>/cache`, where trials running at once score
each entry once under its lease: `locks.py`). Held-out metrics are recomputed per
trial, from those cached passes.

Outputs in `<output>/`: `results.csv` and `results.md` (sorted by the metric: each trial's order,
stages, hyperparameters, metric per stage, reused stages, pruned), `metric.png` (the metric per stage,
every trial), `best_job.yaml` (a job `sdpo run` accepts that reproduces the best trial), `trials/<id>/`
(each trial's run directory), `tune/` (Ray Tune's own storage).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

from sdpo import storage
from sdpo.config import ConfigError, parse_job


def _trial(config: dict, *, space: Any, out: str, trial_cluster: dict[str, float]) -> None:
    """One trial (runs inside a Tune trial actor): the job of `config`, reporting after every stage.

    The parsed space travels with the trial, not its file's path: a trial runs in its own working
    directory, on any node, where a relative (or node-local) path to the space file means nothing."""
    import ray.tune

    from sdpo.pipeline import run
    from sdpo.stage_store import StageStore
    from sdpo.tuning import decode_config, trial_job, trial_name

    trial_id = trial_name(decode_config(space, config))
    raw = trial_job(space, config, trial_id).model_dump(mode="json")
    raw["reference"]["cache_dir"] = raw["reference"].get("cache_dir") or storage.join(out, "cache")
    job = parse_job(raw, origin=f"trial {trial_id}")

    stages, last = job.num_partitions(), {}

    def on_stage(record: dict, reused: bool) -> None:
        m = record["metrics"]
        metrics = {space.metric: m.get(space.metric, math.nan), "stage": record["index"],
                   "partition": record["partition"], "reused": reused, "trial_id": trial_id,
                   "train_seconds": 0.0 if reused else m.get("train_seconds", 0.0)}
        if record["index"] < stages:
            ray.tune.report(metrics)  # the scheduler may stop the trial here (pruned at a stage boundary)
        else:
            last.update(metrics)  # reported once the run has written its summary and report

    run(job, output_dir=storage.join(out, "trials", trial_id), overwrite=True, log=print,
        store=StageStore(storage.join(out, "stage_store")), cluster=trial_cluster, on_stage=on_stage)
    ray.tune.report(last)


def _searcher(space, tune, concurrent: int):
    """(param_space, search_alg) for the space's searcher, running at most `concurrent` trials at once
    (Tune applies `max_concurrent_trials` to its own default generator only, so it is set here)."""
    from sdpo.tuning import optuna_define_by_run, to_tune_param_space

    if space.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("searcher: optuna needs the optuna package (pip install 'sdpo[tune]')") from None
        try:
            alg = OptunaSearch(space=optuna_define_by_run(space), metric=space.metric, mode=space.mode,
                               seed=space.seed)
        except (ImportError, AssertionError) as err:
            raise ConfigError(f"searcher: optuna is not usable here: {err} (pip install 'sdpo[tune]')") from None
        from ray.tune.search import ConcurrencyLimiter

        return {}, ConcurrencyLimiter(alg, max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return to_tune_param_space(space), BasicVariantGenerator(random_state=space.seed, max_concurrent=concurrent)


def _scheduler(space, tune):
    from sdpo.tuning import max_stages

    s = space.scheduler
    if s.type == "fifo":
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=max_stages(space),
                                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def run_tune(space_file: str, *, output: str | None = None, address: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the search; returns {"rows", "best", "results", "best_job", ...}."""
    import ray
    from ray import tune

    from sdpo.pipeline import init_ray, local_ray_options
    from sdpo.plan import PlanError
    from sdpo.tune_results import TrialNeeds, autoscaled_trials, plan_trials
    from sdpo.tuning import load_space, resource_jobs, trial_count, tune_num_samples

    space = load_space(space_file)  # every point checked: an impossible schedule fails here
    base = parse_job(space.base_job, origin=space_file)
    out = storage.abspath(output or storage.join(base.output_dir, space.name))
    storage.check_writable(out)
    if not address and not ray.is_initialized():
        # A local instance on a small machine: a trial's driver, worker, inference actor and Ray Data each
        # need a CPU slot, so offer at least 4 logical CPUs (they time-share the cores; trials run one at
        # a time there). A cluster is taken as it is.
        cpus = max(4, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, log_to_driver=True, **local_ray_options(cpus))
    init_ray(address)
    # The trials plan their stages and passes as `sdpo run` does (their scaling and reference settings;
    # the most demanding where the space searches them) and, with scaling.autoscale, for the nodes the
    # autoscaler adds rather than those up now (a head-only cluster offers no CPU for work).
    needs = list({repr(n): n for n in map(TrialNeeds.of, resource_jobs(space))}.values())
    cluster = ray.cluster_resources()
    if base.scaling.autoscale:
        cluster = autoscaled_trials(cluster, needs, space.max_concurrent_trials)
    most = min(space.max_concurrent_trials or math.inf, trial_count(space))  # no share kept for trials never run
    try:
        plan = plan_trials(cluster, needs, max_concurrent=int(most))
    except PlanError as err:
        raise ConfigError(f"{space_file}: {err}") from None
    log(f"tune {space.name}: {space.searcher} search over {list(space.search)}, metric {space.metric} ({space.mode}); "
        f"{plan.concurrent} trial(s) at a time, each with {plan.trial_cluster}")
    param_space, search_alg = _searcher(space, tune, plan.concurrent)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, space=space, out=out, trial_cluster=plan.trial_cluster),
        {"CPU": plan.driver_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg,
                                    scheduler=_scheduler(space, tune), num_samples=tune_num_samples(space)),
        run_config=tune.RunConfig(name=space.name, storage_path=storage.join(out, "tune"), verbose=1),
    )
    if os.environ.get("SDPO_SHIPPED"):
        # A submitted job runs in its working copy, which Ray's runtime-env agent deletes once no worker on
        # this node uses it any more (trials end, the driver does not count): Tune's own path arithmetic
        # then fails on the vanished cwd. Everything is loaded by now; go on from a directory that stays.
        os.chdir(tempfile.gettempdir())
    results = tuner.fit()
    return _summarise(space, out, results, log)


def _trial_record(space, out: str, result: Any) -> dict:
    """A finished, pruned or failed trial as `tune_results` reads it: its config and per-stage records
    (from the trial's manifest, which holds every completed stage even when the trial was stopped)."""
    from sdpo.manifest import MANIFEST
    from sdpo.tuning import decode_config, stage_count, trial_name

    config = decode_config(space, dict(result.config or {}))
    trial_id = trial_name(config)
    manifest = storage.join(out, "trials", trial_id, MANIFEST)
    entries = storage.read_json(manifest)["stages"] if storage.exists(manifest) else {}
    stages = [{"index": int(i), "partition": e["record"]["partition"], "metrics": e["record"]["metrics"],
               "reused": bool(e["record"].get("reused_from"))} for i, e in sorted(entries.items(), key=lambda x: int(x[0]))]
    planned = stage_count(space, config)
    error = result.error is not None
    return {"trial": trial_id, "config": config, "stages": stages, "planned_stages": planned,
            "pruned": not error and len(stages) < planned, "status": "ERROR" if error else "TERMINATED",
            "error": str(result.error).splitlines()[0] if error else None}


def _summarise(space, out: str, results: Any, log: Callable[[str], None]) -> dict:
    from sdpo.tune_results import best_job_yaml, plot_metric, results_table, write_results

    trials = [_trial_record(space, out, r) for r in results]
    rows, markdown = results_table(trials, space.metric, space.mode)
    csv_path, md_path = write_results(out, rows, markdown)
    plot = plot_metric(storage.join(out, "metric.png"), trials, space.metric)
    complete = [r for r in rows if not r["pruned"] and r["status"] == "TERMINATED" and r["final"] is not None]
    best = None
    if complete:
        best = next(t for t in trials if t["trial"] == complete[0]["trial"])
        text = best_job_yaml(space, best["config"], trial_id=best["trial"], value=complete[0]["final"])
        storage.write_text_atomic(storage.join(out, "best_job.yaml"), text)
    reused = [s for t in trials for s in t["stages"] if s["reused"]]
    saved = sum(s["metrics"].get("train_seconds", 0.0) for s in reused)
    steps = sum(int(s["metrics"].get("steps", 0)) for s in reused)
    trained = sum(len(t["stages"]) for t in trials) - len(reused)
    log(f"tune {space.name}: {len(trials)} trials, {sum(t['pruned'] for t in trials)} pruned, "
        f"{sum(t['status'] == 'ERROR' for t in trials)} failed; {trained} stages trained, {len(reused)} reused "
        f"from other trials (saved {steps} optimiser steps, ~{saved:.0f}s of training)")
    log(markdown)
    log(f"results: {csv_path}, {md_path}; plot: {plot}")
    if best:
        log(f"best trial {best['trial']}: {space.metric} = {complete[0]['final']:.4f}; "
            f"rerun it with: sdpo run {storage.join(out, 'best_job.yaml')}")
    else:
        log("no trial completed all its stages; no best_job.yaml")
    for t in trials:
        if t["status"] == "ERROR":
            log(f"trial {t['trial']} failed: {t['error']}")
    return {"rows": rows, "trials": trials, "best": best, "reused_stages": len(reused), "trained_stages": trained,
            "saved_steps": steps, "results_csv": csv_path, "results_md": md_path, "plot": plot,
            "best_job": storage.join(out, "best_job.yaml") if best else None}
