"""The sDPO driver: check inputs, ingest, plan, train the stages in order, write the summary.

Stage t is a Ray Train `TorchTrainer` whose reference is M_{t-1} (frozen) and whose policy starts
from M_{t-1} (`init: previous`) or from the base model (`init: base`). M_{t-1} travels to stage t as
the Ray `Checkpoint` of stage t-1, so it works the same on one machine or a cluster; the driver also
writes it to `<output>/stages/<t>/model/` in Hugging Face format.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo import storage
from sdpo.config import ConfigError, JobConfig
from sdpo.locks import Lease
from sdpo.manifest import MANIFEST, Manifest, differences, model_identity, stage_inputs, stage_settings
from sdpo.plan import (
    BASE,
    PlanError,
    StagePlan,
    autoscaled_view,
    format_plan,
    plan_resources,
    plan_scoring,
    plan_stages,
    train_run_name,
    train_run_prefix,
    training_layout,
)
from sdpo.stage_store import stage_key

SUMMARY = "summary.json"
REJECTED = "rejected_rows.jsonl"
CACHE = "cache"
BUILTIN = "builtin:quickstart/"
SHIPPED_ENV = "SDPO_SHIPPED"  # set by `sdpo submit`: the job's runtime env already carries the sdpo package


# --------------------------------------------------------------------------------------------------
# Inputs: built-in assets, files, model and tokenizer — all checked before Ray starts any work
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo"))


def resolve_builtins(job: JobConfig) -> JobConfig:
    """Replace `builtin:quickstart/...` paths with the tiny offline assets (built on first use)."""
    paths = [job.model.path, job.model.tokenizer or ""] + [p for s in job.data.sources for p in s.paths]
    if not any(p.startswith(BUILTIN) for p in paths):
        return job
    from sdpo.assets import build_quickstart_assets

    assets = build_quickstart_assets(cache_dir() / "quickstart")
    table = {f"{BUILTIN}model": str(assets.model_dir)} | {
        f"{BUILTIN}{name}": str(path) for name, path in assets.sources.items()
    }

    def sub(p: str) -> str:
        if p.startswith(BUILTIN) and p not in table:
            raise ConfigError(f"unknown built-in asset {p!r}; known: {sorted(table)}")
        return table.get(p, p)

    raw = job.model_dump()
    raw["model"]["path"] = sub(job.model.path)
    if job.model.tokenizer:
        raw["model"]["tokenizer"] = sub(job.model.tokenizer)
    for src in raw["data"]["sources"]:
        src["path"] = sub(src["path"]) if isinstance(src["path"], str) else [sub(p) for p in src["path"]]
    return JobConfig.model_validate(raw)


def resolve_files(job: JobConfig) -> dict[str, list[str]]:
    """Expand every source's paths and globs (local or fsspec URL) and look at the files, before Ray starts.

    Errors (ConfigError naming the source and the file or pattern): a pattern matching nothing; a Parquet
    file that is not Parquet or has no usable preference columns; a source whose files are all empty.
    An empty file among non-empty ones is only a warning (empty part files are routine in Spark and Ray
    Data output); the ingest pass counts it in the summary. See `sdpo.inputs`.
    """
    from sdpo.inputs import check_source, expand

    files: dict[str, list[str]] = {}
    for src in job.data.sources:
        found = [f for pattern in src.paths for f in expand(src.name, pattern, src.format)]
        check_source(src.name, found, src.mapping)
        files[src.name] = [f.path for f in found]
    return files


def check_model(job: JobConfig):
    """Load the model's config and the tokenizer in the driver; return the tokenizer.

    A local path that is missing, a file, or a folder without config.json or weights is named with what
    it holds; a hub id is left to transformers, whose error is cut to its first line. Every id the
    tokenizer can produce (its largest id, its special tokens) must be < the model's vocab_size; a
    tokenizer *smaller* than the embedding is fine (embeddings are often padded to a multiple of 64).
    """
    from transformers import AutoConfig

    from sdpo.ingest import load_tokenizer
    from sdpo.inputs import first_line, local_dir_problem

    m = job.model
    tok_key = f"model.tokenizer {m.tokenizer!r}" if m.tokenizer else f"model.path {m.path!r} (its tokenizer)"
    problem = local_dir_problem(m.path, model=True, tokenizer=not m.tokenizer)
    if problem:
        raise ConfigError(f"model.path {m.path!r} {problem}")
    try:
        config = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"model.path {m.path!r} is not a loadable model: {first_line(err)}") from None
    problem = local_dir_problem(m.tokenizer, model=False, tokenizer=True) if m.tokenizer else None
    if problem:
        raise ConfigError(f"{tok_key} {problem}")
    try:
        tok = load_tokenizer(m.tokenizer_path, m.revision, m.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        fix = "" if m.tokenizer else "; set model.tokenizer to the model's tokenizer"
        raise ConfigError(f"{tok_key} is not a loadable tokenizer: {first_line(err)}{fix}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"{tok_key} has no EOS token; completions need one")
    _check_vocabulary(tok, config, tok_key, m.path)
    return tok


def _check_vocabulary(tok: Any, config: Any, tok_key: str, model_path: str) -> None:
    """No token id at or past the model's vocab_size: such ids index past the embedding."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        return
    fix = f"they do not belong together; set model.tokenizer to model {model_path!r}'s own tokenizer"
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tok, f"{name}_token_id", None)
        if isinstance(tid, int) and tid >= vocab:
            raise ConfigError(
                f"{tok_key}: its {name} token {getattr(tok, f'{name}_token')!r} has id {tid}, but model "
                f"{model_path!r} has vocab_size {vocab} (ids 0..{vocab - 1}); {fix}"
            )
    top = max(tok.get_vocab().values(), default=-1)  # ids, not len(tok): a vocabulary may have holes
    if max(len(tok), top + 1) > vocab:
        raise ConfigError(
            f"{tok_key} has {len(tok)} tokens with ids up to {top}, but model {model_path!r} has vocab_size "
            f"{vocab} (ids 0..{vocab - 1}); {fix}"
        )


RUN_LEASE = ".sdpo-run.lock"  # held by the run writing the folder (locks.Lease)
# What a resumed run keeps: the cache, the completed stages, Ray Train's checkpoints (an interrupted
# stage continues from its latest), the held-out score tables and the manifest. The rest is redone.
KEEP_ON_RESUME = (CACHE, "stages", "ray", "eval", MANIFEST, SUMMARY, "report.md", "plots")


def prepare_output(out: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse a non-empty output directory unless `overwrite` or `resume`. Overwriting keeps `cache/`
    (its entries are content-addressed, so they stay valid and a rerun reuses them); resuming keeps
    `KEEP_ON_RESUME` and needs the manifest of an earlier run. Local or any fsspec URL (s3://...); `run`
    has checked that the location can be written (a missing bucket, no permission fail there)."""
    existing = [n for n in (storage.listdir(out) if storage.isdir(out) else []) if n != RUN_LEASE]
    if resume:
        _check_resumable(out, existing)
        keep = KEEP_ON_RESUME
    elif existing:
        if not overwrite:
            raise ConfigError(
                f"output directory {out} is not empty; pass --resume {out} to continue that run, or "
                "--overwrite to replace it"
            )
        keep = (CACHE,)
    else:
        keep = ()
    for name in existing:
        if name not in keep:
            storage.remove(storage.join(out, name))


def _check_resumable(out: str, existing: list[str] | None = None) -> None:
    if MANIFEST not in (existing if existing is not None else
                        storage.listdir(out) if storage.isdir(out) else []):
        raise ConfigError(
            f"cannot resume {out}: it has no {MANIFEST} (not an sdpo run directory, or the run stopped "
            "before its data was ingested); start it again with --overwrite"
        )


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def local_ray_options(num_cpus: int | None = None) -> dict[str, Any]:
    """`ray.init` options for a local instance that sdpo (or a test) starts.

    Ray keeps at most `num_workers_soft_limit` worker processes (default: the CPU count) and kills idle
    workers above it. A stage's Ray Train and Ray Data actors (controller, worker, dataset manager,
    split coordinator, ...) hold workers while using no CPU, so on a small machine every Ray Data
    execution found its task workers killed and started new ones: 39 Python processes started, each
    ~1 s of CPU, for the 2-stage quickstart. Room for those actors keeps the task workers alive."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"_system_config": {"num_workers_soft_limit": cpus + 8}}


def init_ray(address: str | None) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": True}
        if address and not os.environ.get(SHIPPED_ENV):  # `sdpo submit` ships the package with the job itself
            import sdpo

            kwargs["runtime_env"] = {"py_modules": [os.path.dirname(sdpo.__file__)]}
        if not address:
            kwargs |= local_ray_options()
        ray.init(address=address, **kwargs)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray 2.60's Parquet reader (V2) starts a pool of FooterReader actors — up to 32 new processes —
    # for every read_parquet, and kills them after listing. sdpo reads a few parquet directories per
    # stage (partitions, reference entries, held-out rows), so that was ~45 process starts for the
    # quickstart, a fifth of its time on 2 cores. The V1 reader lists footers in reused task workers.
    ctx.use_datasource_v2 = False
    # Blocks leave every operator in a deterministic order: a seeded run trains on the same batches,
    # so a rerun reproduces its stage models bit for bit and hits the reference cache.
    ctx.execution_options.preserve_order = True


def stage_config(job: JobConfig, stage: StagePlan, init: Any, reference: Any, threads: int) -> dict:
    t = job.training
    return {
        "stage": stage.index, "partition": stage.partition, "init": init, "reference": reference,
        "tokenizer": job.model.tokenizer_path, "revision": job.model.revision,
        "trust_remote_code": job.model.trust_remote_code,
        "loss_type": stage.loss, "beta": stage.beta, "loss_options": stage.loss_options,
        "learning_rate": stage.learning_rate, "epochs": stage.epochs, "total_steps": stage.total_steps,
        "batch_size": t.batch_size, "reference_mode": job.reference.mode,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "weight_decay": t.weight_decay, "adam_betas": list(t.adam_betas), "adam_epsilon": t.adam_epsilon,
        "lr_scheduler": t.lr_scheduler, "warmup_ratio": t.warmup_ratio, "max_grad_norm": t.max_grad_norm,
        "precision": t.precision, "logging_steps": t.logging_steps, "shuffle": t.shuffle,
        "shared_prompt": t.shared_prompt, "length_splits": t.length_splits, "parallelism": t.parallelism, "prefix_cache": t.prefix_cache,
        "max_logits_mb": t.max_logits_mb, "gradient_checkpointing": t.gradient_checkpointing,
        "disable_dropout": t.disable_dropout,
        "seed": job.seed * 1000 + stage.index, "torch_threads": threads,
        "checkpoint_every": job.checkpointing.every_steps,
        "inject_fault": os.environ.get("SDPO_INJECT_FAULT"),  # fault drills and tests (worker._inject_fault)
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    job: JobConfig
    out: str  # the run's output: a local path or an fsspec URL (s3://bucket/run)
    stages: list[StagePlan]
    spec: Any
    report: Any
    resources: Any
    scoring: Any  # plan.ScoringPlan: the inference passes' actor pool
    digests: dict[str, str]  # partition (and "_eval") -> content digest
    scores: dict = field(default_factory=dict)  # pair scores and selection: what summary.json records


def prepare_run(job: JobConfig, out: str, *, address: str | None, log: Callable[[str], None],
                cluster: dict[str, float] | None = None) -> Prepared:
    """Everything before training: checks, ingest, split, plan. Raises before any compute is spent."""
    import ray

    from sdpo import ingest

    job = resolve_builtins(job)
    files = resolve_files(job)
    tok = check_model(job)
    init_ray(address)
    _check_shared_storage(job, out, files)
    s = job.scaling
    cluster = cluster or ray.cluster_resources()  # a Tune trial plans within its share
    if s.autoscale:
        cluster = autoscaled_view(cluster, num_workers=s.num_workers, use_gpu=s.use_gpu, data_cpus=s.data_cpus,
                                  resources_per_worker=s.resources_per_worker)
    resources = plan_resources(cluster, num_workers=s.num_workers, use_gpu=s.use_gpu,
                               data_cpus=s.data_cpus, resources_per_worker=s.resources_per_worker)
    r = job.reference
    scoring = plan_scoring(cluster, use_gpu=s.use_gpu, data_cpus=s.data_cpus,
                           num_actors=r.num_actors, num_gpus_per_actor=r.num_gpus_per_actor,
                           num_cpus_per_actor=r.num_cpus_per_actor, precision=r.precision,
                           training_precision=job.training.precision,
                           node_cpus=None if s.autoscale else _largest_node_cpus())
    data_dir = storage.join(out, "data")
    settings = ingest.TokenizerSettings(
        path=job.model.tokenizer_path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code,
        max_length=job.data.max_length, max_prompt_length=job.data.max_prompt_length, eos_id=tok.eos_token_id,
        seed=job.partitioning.seed, eval_seed=job.data.eval.seed, roots=ingest.source_roots(files),
        score_field=job.partitioning.score_field,
        mappings={src.name: src.mapping for src in job.data.sources},
    )
    log(f"reading {sum(len(f) for f in files.values())} file(s) from {len(files)} source(s)")
    report, keys = ingest.prepare(job.data.sources, files, data_dir, settings, storage.join(out, REJECTED))
    _check_rejections(job, report, out)
    from sdpo import pair_scores

    spec, keys, table, scores = pair_scores.split(job, out, keys, _pass_settings(job, out, scoring), resources, log)
    stages = plan_stages(job, spec.names, spec.sizes)  # raises on empty partitions, before the write pass
    _check_rewards(stages, ingest.missing_rewards(spec, keys))
    ingest.write_partitions(data_dir, spec, [src.name for src in job.data.sources], table)
    scores |= pair_scores.record(job, out, data_dir, spec, keys, log) if table is not None else {}
    log(f"rows read {report.total_rows}, valid {sum(report.valid.values())}, "
        f"quarantined {report.total_rejected} (see {storage.join(out, REJECTED)})")
    for name, n in spec.unused.items():
        log(f"note: {n} valid pairs of source {name!r} are not in partitioning.order and will not be trained on")
    log(format_plan(stages, sum(spec.eval_sizes.values())))
    return Prepared(job, out, stages, spec, report, resources, scoring, ingest.partition_digests(spec, keys), scores)


def _check_rewards(stages: list[StagePlan], missing: dict[str, dict[str, int]]) -> None:
    """A stage whose loss needs explicit rewards must have them on every pair of its partition."""
    from sdpo.losses import get_loss

    for s in stages:
        if get_loss(s.loss).needs_rewards and missing.get(s.partition):
            counts = ", ".join(f"{n} from source {src!r}" for src, n in sorted(missing[s.partition].items()))
            raise ConfigError(
                f"stage {s.index} uses loss {s.loss!r}, which needs explicit rewards, but partition "
                f"{s.partition!r} has pairs without them ({counts}). Give those rows score_chosen/score_rejected "
                f"(or use the responses/rewards format), or set a pairwise loss for this stage "
                f"(stages[{s.index - 1}].loss.type)."
            )


def _check_rejections(job: JobConfig, report, out: str) -> None:
    """After the ingest pass: every source read some rows, and at most data.max_rejected_fraction of
    them were quarantined. Files all of whose rows were quarantined are named (likely another format)."""
    from sdpo.inputs import EXPECTED, listing

    for src in job.data.sources:
        if report.rows[src.name] == 0:
            files = report.files.get(src.name, [])
            raise ConfigError(
                f"data.sources[{src.name}]: its {len(files)} file(s) hold no rows (empty, blank lines only, "
                f"or an empty JSON array): {listing(files)}; check the path or glob, or remove the source"
            )
    total, bad = report.total_rows, report.total_rejected
    if total == 0:
        raise ConfigError("the data sources hold no rows")
    if bad / total > job.data.max_rejected_fraction:
        reasons = "\n".join(f"  {src}: {reason}: {n}" for (src, reason), n in report.rejected.most_common(10))
        whole = report.all_rejected_files()
        files = "".join(
            [f"\nEvery row of these files was quarantined; are they in another format? (a row needs {EXPECTED})"]
            + [f"\n  {path}: all {n} rows quarantined" for path, n in whole[:5]]
            + ([f"\n  (+{len(whole) - 5} more files)"] if len(whole) > 5 else [])
        ) if whole else ""
        raise ConfigError(
            f"{bad} of {total} rows ({bad / total:.1%}) were quarantined, more than "
            f"data.max_rejected_fraction={job.data.max_rejected_fraction:g}. Most common reasons:\n{reasons}"
            f"{files}\n"
            f"Each row is listed with its source, file and line in {storage.join(out, REJECTED)}; fix the data or raise the threshold."
        )


def pass_settings(prep: Prepared) -> Any:
    return _pass_settings(prep.job, prep.out, prep.scoring)


def _pass_settings(job: JobConfig, out: str, scoring: Any) -> Any:
    from sdpo.passes import PassSettings

    m, d, t = job.model, job.data, job.training
    return PassSettings(
        plan=scoring, batch_size=job.reference.batch_size,
        cache_dir=storage.abspath(job.reference.cache_dir or storage.join(out, CACHE)),
        tokenization={"tokenizer": m.tokenizer_path, "revision": m.revision, "max_length": d.max_length,
                      "max_prompt_length": d.max_prompt_length},
        revision=m.revision, trust_remote_code=m.trust_remote_code,
        layout=training_layout(shared_prompt=t.shared_prompt, prefix_cache=t.prefix_cache,
                               gradient_checkpointing=t.gradient_checkpointing),
    )


def train_stages(prep: Prepared, manifest: Manifest, *, force: bool = False, store: Any = None,
                 on_stage: Callable[[dict, bool], None] | None = None, log: Callable[[str], None]) -> list[dict]:
    """For each stage: the reference (and base) pass, the TorchTrainer, the held-out pass. A stage the
    manifest records as complete with the same inputs is skipped (a resumed run); see `_completed`.
    With a `StageStore` (a search's trials), a stage another trial trained with the same inputs is
    reused from it, and a stage trained here is published to it. `on_stage(record, reused)` is called
    after every stage (Tune reports there)."""
    from sdpo.caching import model_digest

    job, out = prep.job, prep.out
    settings = pass_settings(prep)
    base = job.model.path
    digests = {BASE: model_digest(base, job.model.revision)}
    # a plain run scores ahead: every pass that loads a model it has loaded anyway for the held-out
    # pass runs in that same pass. A search's trial does not (a pruned trial would waste them, and a
    # stage reused from the stage store needs none).
    evaluator = HeldOut(prep, settings, storage.join(out, "data"), log, ahead=store is None)
    eval_changed = manifest.eval_digest != prep.digests.get("_eval")
    if eval_changed:  # another held-out split: rescore it
        storage.remove(storage.join(out, "eval"))
        manifest.eval_digest = prep.digests.get("_eval")
    untrained = [s for s in prep.stages if manifest.stages.get(s.index) is None]
    evaluator.start(base, digests[BASE], [t for s in untrained for t in evaluator.ahead_targets(
        s, digests[BASE], ref=base if s.reference == BASE else None,
        ref_digest=digests[BASE] if s.reference == BASE else None, base=base, base_digest=digests[BASE])])
    job_dump = job.model_dump(mode="json")
    base_id = model_identity(digests[BASE], base, job.model.revision)
    previous, records = None, []
    for stage in prep.stages:
        ref_digest = digests[BASE] if stage.reference == BASE else digests[stage.index - 1]
        inputs = stage_inputs(
            base=base_id, reference=base_id if stage.reference == BASE else ref_digest,
            init=base_id if stage.init == BASE else digests[stage.index - 1],
            partition=_partition_identity(prep, stage), settings=stage_settings(job_dump, stage.to_dict()),
        )
        done = _completed(prep, manifest, stage, inputs, force, log)
        if done is not None:
            digests[stage.index] = done["model_digest"]
            previous = done["model"]
            record = done["record"]
            if eval_changed:  # its held-out metrics are recomputed on this run's held-out split
                record = dict(record, metrics={k: v for k, v in record["metrics"].items() if "eval/" not in k}
                              | evaluator.after_stage(stage, previous, done["model_digest"]),
                              held_out_tables=evaluator.stage_tables(stage))
                manifest.complete(stage.index, inputs=done["inputs"], model=previous,
                                  model_digest=done["model_digest"], record=record)
                storage.write_json_atomic(storage.join(out, MANIFEST), manifest.to_dict())
            else:
                evaluator.restore(stage, previous, done["model_digest"])
            records.append(record)
            log(f"stage {stage.index}/{len(prep.stages)}: complete (model {previous}); skipped")
            if on_stage:
                on_stage(record, bool(record.get("reused_from")))
            continue
        stored = store.claim(inputs) if store is not None else None
        if stored is not None:
            record = _reuse(prep, stage, stored, previous, evaluator, log)
        else:
            try:
                record = train_stage(prep, stage, previous, ref_digest, digests, settings, evaluator, log,
                                     run_name=train_run_name(job.name, stage.index, stage_key(inputs)))
                if store is not None:
                    store.publish(inputs, stage_dir=storage.join(out, "stages", str(stage.index)), record=record)
            except BaseException:  # the stage's lease is given back, so other trials need not wait it out
                if store is not None:
                    store.release(inputs)
                raise
        previous = record["model"]
        records.append(record)
        digests[stage.index] = record["model_digest"]
        manifest.complete(stage.index, inputs=inputs, model=record["model"], model_digest=record["model_digest"],
                          record=record)
        storage.write_json_atomic(storage.join(out, MANIFEST), manifest.to_dict())
        log(stage_line(record))
        if on_stage:
            on_stage(record, stored is not None)
    return records


def _reuse(prep: Prepared, stage: StagePlan, stored: Any, previous: str | None, evaluator: HeldOut,
           log: Callable[[str], None]) -> dict:
    """A stage another trial trained with the same inputs: its model stays in the store, its step log
    and metrics are copied here, and the held-out metrics are recomputed on this run's eval split."""
    from sdpo.worker import STAGE_METRICS, STEP_LOG

    stage_dir = storage.join(prep.out, "stages", str(stage.index))
    for name in (STEP_LOG, STAGE_METRICS):
        storage.write_text_atomic(storage.join(stage_dir, name), storage.read_text(storage.join(stored.stage_dir, name)))
    record = dict(stored.record)
    base = prep.job.model.path
    record.update(
        model=stored.model, reused_from=stored.key,
        reference=base if stage.reference == BASE else previous, init=base if stage.init == BASE else previous,
        metrics={k: v for k, v in record["metrics"].items() if "eval/" not in k} | evaluator.after_stage(
            stage, stored.model, record["model_digest"]),
    )
    record["held_out_tables"] = evaluator.stage_tables(stage)
    storage.write_json_atomic(storage.join(stage_dir, STAGE_METRICS), record["metrics"])
    log(f"stage {stage.index}/{len(prep.stages)}: reused from the stage store ({stored.key}, "
        f"{record['metrics'].get('steps', 0)} optimiser steps not retrained)")
    return record


def _partition_identity(prep: Prepared, stage: StagePlan) -> str:
    """What identifies a stage's pairs among its inputs: their content (the order they train in is a
    shuffle seeded by the stage's settings), or, with `training.shuffle: false`, their content and
    stored positions, since then the stored order is the training order."""
    from sdpo.passes import order_digest

    if prep.job.training.shuffle:
        return prep.digests[stage.partition]
    return "ordered:" + order_digest(storage.join(prep.out, "data", "partitions", f"split={stage.partition}"))


def _completed(prep: Prepared, manifest: Manifest, stage: StagePlan, inputs: dict, force: bool,
               log: Callable[[str], None]) -> dict | None:
    """The manifest's entry for `stage` if it can be reused as is; None if the stage must be trained.

    Reused: recorded with the same inputs, and its model still has the recorded digest. A model that
    was changed or lost since is retrained (with a log line). Different inputs are an error naming
    them, or with `force` the stage and every later one are retrained.
    """
    from sdpo.caching import model_digest

    done = manifest.stages.get(stage.index)
    if done is None:
        return None
    changed = differences(done["inputs"], inputs)
    if changed and not force:
        raise ConfigError(
            f"stage {stage.index} ({stage.partition!r}) of {prep.out} was completed with other inputs than "
            f"this job gives it:\n  " + "\n  ".join(changed) + "\nResume with the job it was run with, pass "
            f"--force to retrain from stage {stage.index}, or use a new output directory."
        )
    if changed:
        log(f"stage {stage.index}: inputs changed ({'; '.join(changed)}); --force: retraining from here")
    elif not storage.isdir(done["model"]) or model_digest(done["model"]) != done["model_digest"]:
        log(f"stage {stage.index}: its model {done['model']} is missing or no longer has its recorded digest; "
            "retraining from here")
        changed = ["model"]
    if changed:
        for i in manifest.drop_from(stage.index):
            storage.remove(storage.join(prep.out, "stages", str(i)))
        storage.write_json_atomic(storage.join(prep.out, MANIFEST), manifest.to_dict())
        return None
    return done


def train_stage(prep: Prepared, stage: StagePlan, previous: Any, ref_digest: str | None, digests: dict,
                settings: Any, evaluator: HeldOut, log: Callable[[str], None], *, run_name: str) -> dict:
    """One stage: its passes, its TorchTrainer (which continues from its latest checkpoint when Ray
    Train's storage holds an interrupted run of the same name), its verified model and its record.
    `previous`: the path of stage t-1's model (its Hugging Face folder under `<output>/stages/`).
    `run_name` (`plan.train_run_name`) carries the digest of the stage's inputs: the stage's runs under
    other names are of other inputs, and are deleted rather than resumed."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdpo.ingest import split_dataset
    from sdpo.losses import get_loss
    from sdpo.worker import STAGE_METRICS, STEP_LOG, TRAIN_STATE, stage_loop

    job, out = prep.job, prep.out
    world = job.scaling.num_workers
    base = job.model.path
    ref = base if stage.reference == BASE else previous
    init = base if stage.init == BASE else previous
    loss = get_loss(stage.loss)
    passes, gamma = reference_passes(prep, stage, ref, ref_digest, base, digests[BASE], settings, log,
                                     ahead=evaluator.scored_ahead)
    precompute = job.reference.mode == "precompute" and loss.needs_reference
    datasets = {"train": split_dataset(
        storage.join(out, "data"), stage.partition, num_pairs=stage.num_pairs, world_size=world,
        shuffle_seed=(job.seed * 1000 + stage.index) if job.training.shuffle else None,
        reference=passes["reference"].path if precompute else None, groups=loss.listwise,
    )}
    drop_other_runs(storage.join(out, "ray"), train_run_prefix(job.name, stage.index), keep=run_name, log=log)
    trainer = TorchTrainer(
        stage_loop,
        train_loop_config=stage_config(job, stage, init, ref, prep.resources.torch_threads),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker=prep.resources.per_worker),
        run_config=RunConfig(
            name=run_name, storage_path=storage.join(out, "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpointing.num_to_keep),
            failure_config=FailureConfig(max_failures=job.checkpointing.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(),
    )
    log(f"stage {stage.index}/{len(prep.stages)}: training on {stage.partition!r} "
        f"({stage.num_pairs} pairs, reference {stage.reference}, init {stage.init})")
    t0 = time.perf_counter()
    result = trainer.fit()
    stage_dir = storage.join(out, "stages", str(stage.index))
    model = storage.join(stage_dir, "model")
    digest = write_stage_model(result.checkpoint, model, stage_dir, (STEP_LOG, STAGE_METRICS), TRAIN_STATE)
    metrics = storage.read_json(storage.join(stage_dir, STAGE_METRICS))
    if metrics["steps"] != stage.total_steps:
        raise RuntimeError(f"stage {stage.index} ran {metrics['steps']} optimiser steps, planned {stage.total_steps}")
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics |= gamma["metrics"]
    following = [s for s in prep.stages if s.index == stage.index + 1 and s.reference != BASE]
    metrics |= evaluator.after_stage(stage, model, digest, [t for s in following for t in evaluator.ahead_targets(
        s, digest, ref=model, ref_digest=digest, base=base, base_digest=digests[BASE])])
    storage.write_json_atomic(storage.join(stage_dir, STAGE_METRICS), metrics)
    return {
        "index": stage.index, "partition": stage.partition, "num_pairs": stage.num_pairs,
        "reference": ref, "init": init, "model": model, "loss": {"type": stage.loss, "beta": stage.beta, **stage.loss_options},
        "reference_mode": (job.reference.mode if loss.needs_reference else "none"),
        "reference_digest": ref_digest, "model_digest": digest,
        "metrics": metrics, "gamma": gamma["histograms"],
        "cache": {role: e.to_dict() for role, e in passes.items()},
        "held_out_tables": evaluator.stage_tables(stage),
    }


def drop_other_runs(ray_dir: str, prefix: str, *, keep: str, log: Callable[[str], None]) -> None:
    """Delete the Ray Train runs under `ray_dir` named `prefix*` other than `keep`: a stage's runs with
    other inputs (an earlier config, data or base model), whose checkpoints must not be resumed."""
    if not storage.isdir(ray_dir):
        return
    for name in storage.listdir(ray_dir):
        if name.startswith(prefix) and name != keep:
            log(f"removing {storage.join(ray_dir, name)}: a run of the same stage with other inputs")
            storage.remove(storage.join(ray_dir, name))


def write_stage_model(checkpoint: Any, model: str, stage_dir: str, side_files: tuple[str, ...],
                       drop: str) -> str | None:
    """Copy the stage's final checkpoint to `model` (the step log and metrics beside it, in `stage_dir`)
    and verify it before the stage can be marked complete: every file came down whole (sizes equal the
    checkpoint's), and the copy's weights have the digest of what came down. Returns that digest."""
    import tempfile

    import pyarrow.fs

    from sdpo.caching import model_digest

    with tempfile.TemporaryDirectory(prefix="sdpo-stage-") as tmp:
        checkpoint.to_directory(tmp)
        root = checkpoint.path.rstrip("/")
        for info in checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
            rel = info.path[len(root):].lstrip("/")
            if info.type == pyarrow.fs.FileType.File and os.path.getsize(os.path.join(tmp, rel)) != info.size:
                raise RuntimeError(f"stage checkpoint file {rel} came down incomplete ({info.size} bytes expected)")
        for name in side_files:
            storage.write_text_atomic(storage.join(stage_dir, name), Path(tmp, name).read_text())
            os.remove(os.path.join(tmp, name))
        os.remove(os.path.join(tmp, drop))
        expected = model_digest(tmp)
        storage.remove(model)
        storage.upload_dir(tmp, model)
    digest = model_digest(model)
    if digest != expected:
        raise RuntimeError(f"stage model {model} does not read back as written (digest {digest} != {expected})")
    return digest


def pass_needs(prep: Prepared, stage: StagePlan, ref: Any, ref_digest: str | None, base: str,
               base_digest: str | None) -> dict[str, tuple[Any, str | None, bool]]:
    """The passes a stage runs before training, by role: (model, its digest, whether the entry keeps
    the rows' stored order). A reference-free loss gets no reference pass (and gamma under the base
    model only)."""
    from sdpo.losses import get_loss

    job = prep.job
    needed = {}
    if get_loss(stage.loss).needs_reference and (job.reference.mode == "precompute" or job.reference.gamma):
        # a stage trained in stored order reads its rows from the reference entry, so it keeps their positions
        needed["reference"] = (ref, ref_digest, job.reference.mode == "precompute" and not job.training.shuffle)
    if job.reference.gamma:
        needed["base"] = (base, base_digest, False)
    return needed


def reference_passes(prep: Prepared, stage: StagePlan, ref: Any, ref_digest: str | None, base: str,
                     base_digest: str | None, settings: Any, log: Callable[[str], None],
                     ahead: dict | None = None) -> tuple[dict, dict]:
    """The stage's reference pass (cached) and, for the gamma diagnostic, the base model's pass on D_t.

    A listwise loss's passes score every response of each row's group. `ahead`: the cache entries
    scored ahead of their stage, in another pass of the same model (`HeldOut.ahead_targets`), by key.
    """
    from sdpo.diagnostics import gamma_summary
    from sdpo.losses import get_loss
    from sdpo.passes import read_gamma, scored_split

    job, out = prep.job, prep.out
    loss = get_loss(stage.loss)
    split_dir = storage.join(out, "data", "partitions", f"split={stage.partition}")
    entries = {}
    for role, (model, digest, ordered) in pass_needs(prep, stage, ref, ref_digest, base, base_digest).items():
        same = role == "base" and "reference" in entries and digest is not None and digest == ref_digest
        if same:  # stage 1, or init/reference from the base: one pass serves both
            entries[role] = entries["reference"]
            continue
        e = scored_split(split_dir, model=model, model_digest=digest, data_digest=prep.digests[stage.partition],
                         num_rows=stage.num_pairs, settings=settings,
                         uncached_dir=storage.join(out, "scores", f"stage{stage.index}-{role}"), log=log,
                         groups=loss.listwise, ordered=ordered)
        if e.status == "hit" and ahead and e.key in ahead:  # scored ahead in this run: report that pass
            e = ahead.pop(e.key)
        speed = f", {e.pairs_per_s:.1f} pairs/s" if e.pairs_per_s else ""
        together = f"; scored in one pass with {', '.join(e.scored_with)}" if e.scored_with else ""
        log(f"stage {stage.index}: {role} pass on {stage.partition!r}: cache {e.status} "
            f"({e.num_rows} pairs{speed}{together}) {e.path}")
        entries[role] = e
    if not job.reference.gamma:
        return entries, {"metrics": {}, "histograms": {}}
    ref_gamma = read_gamma(entries["reference"].path) if "reference" in entries else None
    metrics, hists = gamma_summary(ref_gamma, read_gamma(entries["base"].path))
    under = [(who, name) for who, name in (("reference", "ref"), ("base", "base")) if f"gamma_{name}/mean" in metrics]
    log(f"stage {stage.index}: gamma on {stage.partition!r}: " + "; ".join(
        f"{who} mean {metrics[f'gamma_{name}/mean']:.3f} median {metrics[f'gamma_{name}/median']:.3f}"
        for who, name in under))
    return entries, {"metrics": metrics, "histograms": hists}


class HeldOut:
    """Held-out evaluation as Ray Data passes: one score table per model (`model_0` the base,
    `model_<t>` stage t), so each stage scores only its own model; a stage's metrics join the tables of
    its policy, reference and base. With `ahead`, the pass that scores a model's table also scores the
    stages' passes that need the same model (`ahead_targets`): one actor start and model load for both."""

    def __init__(self, prep: Prepared, settings: Any, data_dir: str, log: Callable[[str], None], *,
                 ahead: bool = False):
        self.prep, self.settings, self.log, self.ahead = prep, settings, log, ahead
        self.enabled = sum(prep.spec.eval_sizes.values()) > 0
        self.num_rows = sum(prep.spec.eval_sizes.values())
        self.eval_dir = storage.join(prep.out, "eval")
        self.source = f"{data_dir}/partitions/split=_eval"
        self.sources = [s.name for s in prep.job.data.sources]
        self.scored_ahead: dict[str, Any] = {}  # cache key -> CacheEntry, until its stage reports it
        self.tables: dict[int, str] = {}  # model t -> its held-out table
        self.order: str | None = None  # the held-out split's order digest, read once

    def _target(self, t: int, model: Any, digest: str | None) -> Any:
        """Model t's held-out table: recorded in `tables`, and returned as a target to score unless it is
        complete — a cache entry of the held-out split under that model (keyed by the rows' positions as
        well as their content, so its sources and lines are this run's), or, for a model whose digest is
        unknown, this run's own table."""
        from sdpo.caching import CacheEntry
        from sdpo.passes import Target, eval_complete, order_digest, split_target

        if not self.enabled:
            return None
        if self.order is None:
            self.order = order_digest(self.source)
        what = f"the held-out pass of {'the base model' if t == 0 else f'stage {t}'}"
        found = split_target(self.source, model_digest=digest, data_digest=self.prep.digests["_eval"],
                             num_rows=self.num_rows, settings=self.settings,
                             uncached_dir=storage.join(self.eval_dir, f"model_{t}"), order=self.order)
        self.tables[t] = found.path
        if isinstance(found, CacheEntry):
            self.log(f"{what}: cache hit {found.path}")
            return None
        if found.marker is None and eval_complete(found.path, str(model)):
            return None
        return Target(found.source, found.path, found.num_rows, found.marker or {"model": str(model)}, what=what)

    def ahead_targets(self, stage: StagePlan, digest: str | None, *, ref: Any, ref_digest: str | None, base: str,
                      base_digest: str | None) -> list:
        """`stage`'s passes under the model of digest `digest` that are not cached yet, as targets of a
        pass that loads that model anyway (`ref`, `ref_digest`: the stage's reference, None if not known
        yet). None while scoring ahead is off, and none for a listwise loss (its passes score groups) or
        a model whose digest is unknown (not cacheable)."""
        from sdpo.losses import get_loss
        from sdpo.passes import Target, split_target

        if not self.ahead or digest is None or get_loss(stage.loss).listwise:
            return []
        out = []
        split_dir = storage.join(self.prep.out, "data", "partitions", f"split={stage.partition}")
        for role, (_, need_digest, ordered) in pass_needs(self.prep, stage, ref, ref_digest, base, base_digest).items():
            if need_digest != digest:
                continue
            found = split_target(split_dir, model_digest=digest, data_digest=self.prep.digests[stage.partition],
                                 num_rows=stage.num_pairs, settings=self.settings, uncached_dir="", ordered=ordered)
            if isinstance(found, Target) and found.marker is not None:
                out.append(Target(found.source, found.path, found.num_rows, found.marker,
                                  what=f"stage {stage.index}'s {role} pass on {stage.partition!r}"))
        return out

    def _score(self, t: int, model: Any, digest: str | None, also: list) -> None:
        """Model t's held-out table (unless complete) and the targets `also` (the same model's passes
        for later stages), in one pass. Targets scored ahead alone, without a held-out table to share
        the pass with, are left to their stages unless two or more share it."""
        from sdpo.caching import CacheEntry
        from sdpo.passes import score_targets

        first: dict[str, Any] = {}
        for x in also:  # one entry can serve two roles (stage 1's reference and base passes)
            first.setdefault(x.path, x)
        unique = list(first.values())
        targets = [x for x in (self._target(t, model, digest),) if x is not None]
        if not targets and len(unique) < 2:
            unique = []
        targets += unique
        if not targets:
            return
        run = score_targets(model, targets, self.settings, work_dir=storage.join(self.prep.out, "scores", "together"))
        for x in run.waited:
            self.log(f"{x.what}: scored by another process sharing the cache; waited for it ({x.path})")
        if not run.scored:
            return
        seconds, scored = run.seconds, run.scored
        rows = sum(x.num_rows for x in scored)
        self.log(f"{scored[0].what}: scored in {seconds:.1f}s ({rows} pairs"
                 + (f", one pass with {len(scored) - 1} more: " + "; ".join(x.what for x in scored[1:])
                    if len(scored) > 1 else "") + ")")
        for x in scored:
            if x in unique:
                key = x.marker["key"]
                self.scored_ahead[key] = CacheEntry(key, x.path, "miss", seconds, rows / seconds, x.num_rows,
                                                    scored_with=[y.what for y in scored if y is not x])

    def start(self, base: str, digest: str | None, also: list | None = None) -> None:
        self._score(0, base, digest, also or [])

    def restore(self, stage: StagePlan, model: str, digest: str | None) -> None:
        """A skipped (completed) stage: its score table is reused if complete, else rescored."""
        self._score(stage.index, model, digest, [])

    def stage_tables(self, stage: StagePlan) -> dict[str, str]:
        """The held-out tables of a stage's model, its reference and the base model (none without a
        held-out split)."""
        return self._tables(stage.index, stage.index - 1) if self.enabled else {}

    def _tables(self, policy: int, reference: int) -> dict[str, str]:
        return {"policy": self.tables[policy], "reference": self.tables[reference], "base": self.tables[0]}

    def _metrics(self, policy: int, reference: int, stage: StagePlan) -> dict[str, float]:
        """The held-out loss is the stage's own loss on each pair; a listwise loss's is DPO's (sigmoid),
        since held-out rows are scored as their binarised pairs."""
        from sdpo.losses import get_loss
        from sdpo.passes import eval_metrics

        loss_type, options = stage.loss, stage.loss_options
        if get_loss(loss_type).listwise:
            loss_type, options = "sigmoid", {}
        return eval_metrics(self._tables(policy, reference), loss_type=loss_type, beta=stage.beta, options=options, sources=self.sources)

    def after_stage(self, stage: StagePlan, model: Any, digest: str | None,
                    also: list | None = None) -> dict[str, float]:
        """`eval/*` for the stage's model and `before/eval/*` for the model it started from. `also`:
        passes of the next stage under this model, scored in the same pass (`ahead_targets`)."""
        t = stage.index
        before = self._metrics(policy=0 if stage.init == BASE else t - 1, reference=t - 1, stage=stage) \
            if self.enabled else {}
        self._score(t, model, digest, also or [])
        if not self.enabled:
            return {}
        after = self._metrics(policy=t, reference=t - 1, stage=stage)
        return {f"before/{k}": v for k, v in before.items()} | after


def stage_line(record: dict) -> str:
    m = record["metrics"]
    parts = [f"stage {record['index']} done in {m['wall_seconds']:.0f}s: "
             f"loss {m['first_step_loss']:.4f} -> {m.get('final/loss', float('nan')):.4f}"]
    if "eval/ranking_accuracy" in m:
        parts.append(f"held-out ranking accuracy {m.get('before/eval/ranking_accuracy', float('nan')):.3f} -> "
                     f"{m['eval/ranking_accuracy']:.3f}")
        per_source = sorted({k.split("/")[1] for k in m if k.startswith("eval/") and k.count("/") == 2})
        for src in per_source:
            parts.append(f"{src} {m.get(f'before/eval/{src}/ranking_accuracy', float('nan')):.3f} -> "
                         f"{m[f'eval/{src}/ranking_accuracy']:.3f}")
    return "; ".join(parts)


def run(job: JobConfig, *, output_dir: str | None = None, address: str | None = None, overwrite: bool = False,
        plan_only: bool = False, resume: bool = False, force: bool = False,
        log: Callable[[str], None] = print, store: Any = None, cluster: dict[str, float] | None = None,
        on_stage: Callable[[dict, bool], None] | None = None) -> dict:
    """Run (or, with `plan_only`, check and plan) an sDPO job; returns the summary.

    `resume`: continue the run in the output directory — completed stages are skipped, an interrupted
    stage continues from its latest checkpoint; a completed stage whose inputs the job has changed is
    an error, or with `force` retrained (with every later stage). `store`, `cluster` and `on_stage` are for
    Tune trials (see `train_stages` and `tune.py`)."""
    out = storage.abspath(output_dir or job.output_dir)
    log = _redacting(log)
    if force and not resume:
        raise ConfigError("--force applies to --resume (it retrains a resumed run from its first changed stage)")
    if resume:  # before the claim below creates the folder of a mistyped path
        _check_resumable(out)
    storage.check_writable(out)
    lease = Lease(storage.join(out, RUN_LEASE))
    if not lease.acquire():
        raise ConfigError(
            f"{out} is in use by another sdpo run ({lease.holder()}); wait for it to finish or stop it, or "
            "give this run another --output. (A run that died on another node leaves its claim for "
            f"{lease.stale_after / 60:.0f} minutes after its last beat; one that died on this machine, none.)")
    try:
        return _run(job, out, address=address, overwrite=overwrite, plan_only=plan_only, resume=resume,
                    force=force, log=log, store=store, cluster=cluster, on_stage=on_stage)
    finally:
        lease.release()


def _run(job: JobConfig, out: str, *, address: str | None, overwrite: bool, plan_only: bool, resume: bool,
         force: bool, log: Callable[[str], None], store: Any, cluster: dict[str, float] | None,
         on_stage: Callable[[dict, bool], None] | None) -> dict:
    manifest_uri = storage.join(out, MANIFEST)
    manifest = Manifest.from_dict(storage.read_json(manifest_uri)) if resume and storage.exists(manifest_uri) else None
    prepare_output(out, overwrite, resume)
    try:
        prep = prepare_run(job, out, address=address, log=log, cluster=cluster)
    except PlanError as err:
        raise ConfigError(str(err)) from None
    summary = {
        "job": prep.job.name,
        "config": prep.job.model_dump(mode="json"),
        "base_model": prep.job.model.path,
        "plan": [s.to_dict() for s in prep.stages],
        "data": prep.report.to_dict() | {
            "partitions": dict(zip(prep.spec.names, prep.spec.sizes, strict=True)),
            "eval": prep.spec.eval_sizes, "unused": prep.spec.unused, "tokens": prep.report.tokens,
        },
        "rejected_rows": prep.report.total_rejected,
        "rejected_rows_file": storage.join(out, REJECTED),
        "scores": prep.scores,
        "dropped_pairs": prep.scores.get("selection", {}).get("dropped", 0),
        "stages": [],
        "final_model": None,
    }
    if manifest is None:
        manifest = Manifest(job=summary["config"])
    manifest.job = summary["config"]
    if not plan_only:
        storage.write_json_atomic(manifest_uri, manifest.to_dict())
        summary["stages"] = train_stages(prep, manifest, force=force, store=store, on_stage=on_stage, log=log)
        summary["final_model"] = summary["stages"][-1]["model"]
    storage.write_json_atomic(storage.join(out, SUMMARY), summary)
    if not plan_only:
        from sdpo.report import write_report

        report = write_report(out)
        log(report.table)
        log(f"report: {report.markdown_path}")
    return summary


def _redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    """Every line the run logs passes `storage.redact`: no credential reaches a log."""
    return lambda line: log(storage.redact(line))


def _largest_node_cpus() -> float | None:
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(cpus) if cpus else None


def _check_shared_storage(job: JobConfig, out: str, files: dict[str, list[str]]) -> None:
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if job.scaling.autoscale:
        nodes = max(nodes, 2)  # the nodes it will add see none of this one's disk
    problem = unshared_paths(nodes, job, out, files)
    if problem:
        raise ConfigError(problem)


def unshared_paths(nodes: int, job: JobConfig, out: str, files: dict[str, list[str]]) -> str | None:
    """On a multi-node cluster every node reads the partitions, the reference caches and the stage models
    the others wrote: a local path would exist on one node only. The refusal's message, or None."""
    if nodes < 2 or job.scaling.shared_filesystem:
        return None
    places = [("the output", out)] + ([("reference.cache_dir", job.reference.cache_dir)] if job.reference.cache_dir else [])
    places += [(f"data.sources[{name}]", paths[0]) for name, paths in files.items() if paths]
    local = [(what, where) for what, where in places if storage.is_local(where)]
    if not local:
        return None
    names = ", ".join(f"{what} ({where})" for what, where in local)
    return (
        f"the Ray cluster has {nodes} nodes, but {names} {'is a local path' if len(local) == 1 else 'are local paths'}: "
        "what one node writes or reads there, the others cannot see. Put it on object storage (s3://bucket/...; "
        "credentials and endpoint come from the standard AWS environment), or set scaling.shared_filesystem: true "
        "if the path is on storage every node mounts (NFS, Lustre)."
    )
