"""The sDPO driver: check inputs, ingest, plan, train the stages in order, write the summary.

Stage t is a Ray Train `TorchTrainer` whose reference is M_{t-1} (frozen) and whose policy starts
from M_{t-1} (`init: previous`) or from the base model (`init: base`). M_{t-1} travels to stage t as
the Ray `Checkpoint` of stage t-1, so it works the same on one machine or a cluster; the driver also
writes it to `<output>/stages/<t>/model/` in Hugging Face format.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo.config import ConfigError, JobConfig
from sdpo.plan import BASE, PlanError, StagePlan, format_plan, plan_resources, plan_scoring, plan_stages

SUMMARY = "summary.json"
REJECTED = "rejected_rows.jsonl"
CACHE = "cache"
BUILTIN = "builtin:quickstart/"


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
    """Expand every source's paths and globs (local or fsspec URL); a pattern matching nothing is an error."""
    import fsspec

    files: dict[str, list[str]] = {}
    for src in job.data.sources:
        found: list[str] = []
        for pattern in src.paths:
            fs, _, matches = fsspec.get_fs_token_paths(pattern)
            matches = [m for m in matches if fs.isfile(m)]
            if not matches:
                raise ConfigError(
                    f"data.sources[{src.name}].path: {pattern!r} matches no file; check the path or glob"
                )
            protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
            found += sorted(m if protocol in ("file", "local") else f"{protocol}://{m}" for m in matches)
        files[src.name] = found
    return files


def check_model(job: JobConfig):
    """Load the model's config and the tokenizer in the driver; return the tokenizer."""
    from transformers import AutoConfig

    from sdpo.ingest import load_tokenizer

    m = job.model
    try:
        config = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path {m.path!r} is not a loadable model: {err}") from None
    try:
        tok = load_tokenizer(m.tokenizer_path, m.revision, m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.tokenizer {m.tokenizer_path!r} is not a loadable tokenizer: {err}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {m.tokenizer_path!r} has no EOS token; completions need one")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ConfigError(
            f"tokenizer {m.tokenizer_path!r} has {len(tok)} tokens but model {m.path!r} only {vocab}; "
            "they do not belong together (set model.tokenizer to the model's own tokenizer)"
        )
    return tok


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless `overwrite`; overwriting keeps `cache/` — its entries
    are content-addressed, so they stay valid and a rerun reuses them."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace it")
        for child in out.iterdir():
            if child.name == CACHE:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def init_ray(address: str | None) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": True}
        if address:
            import sdpo

            kwargs["runtime_env"] = {"py_modules": [os.path.dirname(sdpo.__file__)]}
        ray.init(address=address, **kwargs)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
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
        "seed": job.seed * 1000 + stage.index, "torch_threads": threads,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    job: JobConfig
    out: Path
    stages: list[StagePlan]
    spec: Any
    report: Any
    resources: Any
    scoring: Any  # plan.ScoringPlan: the inference passes' actor pool
    digests: dict[str, str]  # partition (and "_eval") -> content digest


def prepare_run(job: JobConfig, out: Path, *, address: str | None, log: Callable[[str], None]) -> Prepared:
    """Everything before training: checks, ingest, split, plan. Raises before any compute is spent."""
    import ray

    from sdpo import ingest
    from sdpo.partition import plan_partitions

    job = resolve_builtins(job)
    files = resolve_files(job)
    tok = check_model(job)
    init_ray(address)
    s = job.scaling
    resources = plan_resources(ray.cluster_resources(), num_workers=s.num_workers, use_gpu=s.use_gpu,
                               data_cpus=s.data_cpus, resources_per_worker=s.resources_per_worker)
    r = job.reference
    scoring = plan_scoring(ray.cluster_resources(), use_gpu=s.use_gpu, data_cpus=s.data_cpus,
                           num_actors=r.num_actors, num_gpus_per_actor=r.num_gpus_per_actor,
                           num_cpus_per_actor=r.num_cpus_per_actor, precision=r.precision)
    data_dir = str((out / "data").resolve())
    settings = ingest.TokenizerSettings(
        path=job.model.tokenizer_path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code,
        max_length=job.data.max_length, max_prompt_length=job.data.max_prompt_length, eos_id=tok.eos_token_id,
        seed=job.partitioning.seed, eval_seed=job.data.eval.seed, roots=ingest.source_roots(files),
    )
    log(f"reading {sum(len(f) for f in files.values())} file(s) from {len(files)} source(s)")
    report, keys = ingest.prepare(job.data.sources, files, data_dir, settings, str(out / REJECTED))
    _check_rejections(job, report, out)
    p = job.partitioning
    spec = plan_partitions(
        {name: k[:2] for name, k in keys.items()}, strategy=p.strategy.value, order=p.order, num_parts=p.num_parts, proportions=p.proportions,
        eval_fraction=job.data.eval.fraction, eval_cap=job.data.eval.max_pairs_per_source,
    )
    stages = plan_stages(job, spec.names, spec.sizes)  # raises on empty partitions, before the write pass
    _check_rewards(stages, ingest.missing_rewards(spec, keys))
    ingest.write_partitions(data_dir, spec, [src.name for src in job.data.sources])
    log(f"rows read {report.total_rows}, valid {sum(report.valid.values())}, "
        f"quarantined {report.total_rejected} (see {out / REJECTED})")
    for name, n in spec.unused.items():
        log(f"note: {n} valid pairs of source {name!r} are not in partitioning.order and will not be trained on")
    log(format_plan(stages, sum(spec.eval_sizes.values())))
    return Prepared(job, out, stages, spec, report, resources, scoring, ingest.partition_digests(spec, keys))


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


def _check_rejections(job: JobConfig, report, out: Path) -> None:
    total, bad = report.total_rows, report.total_rejected
    if total == 0:
        raise ConfigError("the data sources hold no rows")
    if bad / total > job.data.max_rejected_fraction:
        reasons = "\n".join(f"  {src}: {reason}: {n}" for (src, reason), n in report.rejected.most_common(10))
        raise ConfigError(
            f"{bad} of {total} rows ({bad / total:.1%}) were quarantined, more than "
            f"data.max_rejected_fraction={job.data.max_rejected_fraction:g}. Most common reasons:\n{reasons}\n"
            f"Each row is listed with its source, file and line in {out / REJECTED}; fix the data or raise the threshold."
        )


def pass_settings(prep: Prepared) -> Any:
    from sdpo.passes import PassSettings

    job = prep.job
    m, d = job.model, job.data
    return PassSettings(
        plan=prep.scoring, batch_size=job.reference.batch_size,
        cache_dir=job.reference.cache_dir or str((prep.out / CACHE).resolve()),
        tokenization={"tokenizer": m.tokenizer_path, "revision": m.revision, "max_length": d.max_length,
                      "max_prompt_length": d.max_prompt_length},
        revision=m.revision, trust_remote_code=m.trust_remote_code,
    )


def train_stages(prep: Prepared, *, log: Callable[[str], None]) -> list[dict]:
    """For each stage: the reference (and base) pass, the TorchTrainer, the held-out pass."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdpo.caching import model_digest
    from sdpo.ingest import split_dataset
    from sdpo.losses import get_loss
    from sdpo.worker import STAGE_METRICS, STEP_LOG, stage_loop

    job, out = prep.job, prep.out
    world = job.scaling.num_workers
    data_dir = str((out / "data").resolve())
    settings = pass_settings(prep)
    base = job.model.path
    digests = {BASE: model_digest(base, job.model.revision)}
    evaluator = HeldOut(prep, settings, data_dir, log)
    evaluator.start(base)
    previous, records = None, []
    for stage in prep.stages:
        ref = base if stage.reference == BASE else previous
        init = base if stage.init == BASE else previous
        ref_digest = digests[BASE] if stage.reference == BASE else digests[stage.index - 1]
        loss = get_loss(stage.loss)
        passes, gamma = reference_passes(prep, stage, ref, ref_digest, base, digests[BASE], settings, log)
        precompute = job.reference.mode == "precompute" and loss.needs_reference
        datasets = {"train": split_dataset(
            data_dir, stage.partition, num_pairs=stage.num_pairs, world_size=world,
            shuffle_seed=(job.seed * 1000 + stage.index) if job.training.shuffle else None,
            reference=passes["reference"].path if precompute else None, groups=loss.listwise,
        )}
        trainer = TorchTrainer(
            stage_loop,
            train_loop_config=stage_config(job, stage, init, ref, prep.resources.torch_threads),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=job.scaling.use_gpu,
                                         resources_per_worker=prep.resources.per_worker),
            run_config=RunConfig(name=stage.run_name, storage_path=str((out / "ray").resolve())),
            datasets=datasets,
            dataset_config=DataConfig(),
        )
        log(f"stage {stage.index}/{len(prep.stages)}: training on {stage.partition!r} "
            f"({stage.num_pairs} pairs, reference {stage.reference}, init {stage.init})")
        t0 = time.perf_counter()
        result = trainer.fit()
        stage_dir = out / "stages" / str(stage.index)
        model_path = stage_dir / "model"
        result.checkpoint.to_directory(str(model_path))
        for name in (STEP_LOG, STAGE_METRICS):
            shutil.move(str(model_path / name), str(stage_dir / name))
        digests[stage.index] = model_digest(str(model_path))
        metrics = json.loads((stage_dir / STAGE_METRICS).read_text())
        metrics["wall_seconds"] = time.perf_counter() - t0
        metrics |= gamma["metrics"]
        metrics |= evaluator.after_stage(stage, result.checkpoint)
        write_json_atomic(stage_dir / STAGE_METRICS, metrics)
        records.append({
            "index": stage.index, "partition": stage.partition, "num_pairs": stage.num_pairs,
            "reference": base if stage.reference == BASE else records[-1]["model"],
            "init": base if stage.init == BASE else records[-1]["model"],
            "model": str(model_path.resolve()), "loss": {"type": stage.loss, "beta": stage.beta, **stage.loss_options},
            "reference_mode": (job.reference.mode if loss.needs_reference else "none"),
            "reference_digest": ref_digest, "model_digest": digests[stage.index],
            "metrics": metrics, "gamma": gamma["histograms"],
            "cache": {role: e.to_dict() for role, e in passes.items()},
        })
        log(stage_line(records[-1]))
        previous = result.checkpoint
    return records


def reference_passes(prep: Prepared, stage: StagePlan, ref: Any, ref_digest: str | None, base: str,
                     base_digest: str | None, settings: Any, log: Callable[[str], None]) -> tuple[dict, dict]:
    """The stage's reference pass (cached) and, for the gamma diagnostic, the base model's pass on D_t.

    A reference-free loss gets no reference pass (and gamma under the base model only); a listwise
    loss's passes score every response of each row's group.
    """
    from sdpo.diagnostics import gamma_summary
    from sdpo.losses import get_loss
    from sdpo.passes import read_gamma, scored_split

    job, out = prep.job, prep.out
    loss = get_loss(stage.loss)
    split_dir = str((out / "data" / "partitions" / f"split={stage.partition}").resolve())
    needed = {}
    if loss.needs_reference and (job.reference.mode == "precompute" or job.reference.gamma):
        needed["reference"] = (ref, ref_digest)
    if job.reference.gamma:
        needed["base"] = (base, base_digest)
    entries = {}
    for role, (model, digest) in needed.items():
        same = role == "base" and "reference" in entries and digest is not None and digest == ref_digest
        if same:  # stage 1, or init/reference from the base: one pass serves both
            entries[role] = entries["reference"]
            continue
        e = scored_split(split_dir, model=model, model_digest=digest, data_digest=prep.digests[stage.partition],
                         num_rows=stage.num_pairs, settings=settings,
                         uncached_dir=str((out / "scores" / f"stage{stage.index}-{role}").resolve()), log=log,
                         groups=loss.listwise)
        speed = f", {e.pairs_per_s:.1f} pairs/s" if e.pairs_per_s else ""
        log(f"stage {stage.index}: {role} pass on {stage.partition!r}: cache {e.status} "
            f"({e.num_rows} pairs{speed}) {e.path}")
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
    """Held-out evaluation as Ray Data passes: the eval rows gain one pair of log-prob columns per model
    (`m0_` the base, `m<t>_` stage t), so each stage scores only its own model."""

    def __init__(self, prep: Prepared, settings: Any, data_dir: str, log: Callable[[str], None]):
        self.prep, self.settings, self.log = prep, settings, log
        self.enabled = sum(prep.spec.eval_sizes.values()) > 0
        self.eval_dir = prep.out / "eval"
        self.source = f"{data_dir}/partitions/split=_eval"
        self.sources = [s.name for s in prep.job.data.sources]

    def _scores(self, t: int) -> str:
        return str((self.eval_dir / f"scores_{t}").resolve())

    def start(self, base: str) -> None:
        from sdpo.passes import extend_eval

        if self.enabled:
            seconds = extend_eval(self.source, self._scores(0), model=base, prefix="m0_", settings=self.settings,
                                  first=True)
            self.log(f"held-out: base model scored in {seconds:.1f}s")

    def _metrics(self, table: int, policy: int, reference: int, stage: StagePlan) -> dict[str, float]:
        """The held-out loss is the stage's own loss on each pair; a listwise loss's is DPO's (sigmoid),
        since held-out rows are scored as their binarised pairs."""
        from sdpo.losses import get_loss
        from sdpo.passes import eval_metrics

        loss_type, options = stage.loss, stage.loss_options
        if get_loss(loss_type).listwise:
            loss_type, options = "sigmoid", {}
        return eval_metrics(self._scores(table), policy=f"m{policy}_", reference=f"m{reference}_", base="m0_",
                            loss_type=loss_type, beta=stage.beta, options=options, sources=self.sources)

    def after_stage(self, stage: StagePlan, model: Any) -> dict[str, float]:
        """`eval/*` for the stage's model and `before/eval/*` for the model it started from."""
        from sdpo.passes import extend_eval

        if not self.enabled:
            return {}
        t = stage.index
        start = 0 if stage.init == BASE else t - 1
        before = self._metrics(t - 1, policy=start, reference=t - 1, stage=stage)
        extend_eval(self._scores(t - 1), self._scores(t), model=model, prefix=f"m{t}_", settings=self.settings,
                    first=False)
        after = self._metrics(t, policy=t, reference=t - 1, stage=stage)
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
        plan_only: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or, with `plan_only`, check and plan) an sDPO job; returns the summary."""
    out = Path(output_dir or job.output_dir)
    prepare_output(out, overwrite)
    try:
        prep = prepare_run(job, out, address=address, log=log)
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
        "rejected_rows_file": str((out / REJECTED).resolve()),
        "stages": [],
        "final_model": None,
    }
    if not plan_only:
        summary["stages"] = train_stages(prep, log=log)
        summary["final_model"] = summary["stages"][-1]["model"]
    write_json_atomic(out / SUMMARY, summary)
    if not plan_only:
        from sdpo.report import write_report

        report = write_report(str(out))
        log(report.table)
        log(f"report: {report.markdown_path}")
    return summary


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
