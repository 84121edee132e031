"""Per-pair scores before the split: difficulty (γ under the base model) and learnability (LoBaSS).

Score strategies and selections need every training pair's score before the partitions are cut, so
between the ingest's two passes (see ingest.py):

1. the training pool = the valid rows that are not held out (the held-out cut depends on the eval keys
   alone, so it is known first);
2. a base pass: the project's scoring pass (`passes.scored_split`) over the pool, under the base model,
   content-addressed in the cache like a reference pass (an identical pass of a partition with the same
   pairs is the same entry). γ per pair follows from its log-probs;
3. for `learnability_top`, the probe: a short DPO stage from the base model on the pool (the base pass
   is its precomputed reference), run by the same stage loop as every stage and cached under
   `<cache>/probes/<key>/` (the key hashes the base model, the pool and every setting the probe
   trains with), then a probe pass over the pool. Learnability per pair: `ranking.learnability`;
4. the driver holds the scores by content key (`ranking.ScoreTable`, 8 bytes a pair and score) and
   ships that table to the second ingest pass, which cuts by score and writes the scores as columns
   into the partition files: `gamma`, `gamma_per_token`, `difficulty` (the one `partitioning.difficulty`
   picks) and `learnability`.

Cost: one inference pass over the training pairs for difficulty; for learnability one short training
stage and a second pass. On a rerun all three come from the cache (the log says so).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdpo import caching, ranking, storage
from sdpo.config import JobConfig, SplitStrategy
from sdpo.partition import eval_cutoff

DROPPED_FILE = "dropped_pairs.jsonl"
SCORE_COLUMNS = ["content_key", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"]


def needs_model(job: JobConfig) -> bool:
    """Whether the split needs model scores (a base pass, and for a selection a probe)."""
    p = job.partitioning
    return p.strategy in (SplitStrategy.easy_to_hard, SplitStrategy.hard_to_easy) or \
        p.selection.strategy == "learnability_top"


def descending(job: JobConfig) -> bool:
    """Stage 1 gets the highest scores: easy_to_hard (high γ = easy) and score_column by default."""
    p = job.partitioning
    if p.strategy is SplitStrategy.score_column:
        return p.score_order == "descending"
    return p.strategy is not SplitStrategy.hard_to_easy


# --------------------------------------------------------------------------------------------------
# The pool and its passes
# --------------------------------------------------------------------------------------------------
def _pool_block(batch: pa.Table, eval_cut: dict[str, int]) -> pa.Table:
    """Valid, not held-out rows, with the columns a scoring pass reads."""
    cuts = np.array([eval_cut.get(s, 0) for s in batch.column("source").to_pylist()], dtype=np.int64)
    keep = pc.and_(pc.equal(batch.column("reason"), ""),
                   pa.array(batch.column("eval_key").to_numpy() >= cuts))
    return batch.filter(keep).select(["prompt_ids", "chosen_ids", "rejected_ids", "content_key"])


def pool_rows(data_dir: str, eval_cut: dict[str, int]):
    import ray.data

    cols = ["source", "reason", "eval_key", "prompt_ids", "chosen_ids", "rejected_ids", "content_key"]
    return ray.data.read_parquet(f"{data_dir}/prepared", columns=cols).map_batches(
        _pool_block, fn_kwargs={"eval_cut": eval_cut}, batch_format="pyarrow")


def read_scores(path: str) -> dict[str, np.ndarray]:
    """A scored entry's log-probs by unique content key (sorted): a few numbers a pair in the driver."""
    import ray.data

    parts = list(ray.data.read_parquet(path, columns=SCORE_COLUMNS).iter_batches(batch_format="numpy",
                                                                                 batch_size=65536))
    cols = {c: np.concatenate([b[c] for b in parts]) if parts else np.empty(0) for c in SCORE_COLUMNS}
    _, first = np.unique(cols["content_key"].astype(np.int64), return_index=True)
    return {c: v[first] for c, v in cols.items()}


def probe_key(job: JobConfig, base_digest: str, pool_entry: str) -> str:
    """Everything the probe's weights depend on: the base model, the pool's base pass (its model, pairs,
    tokenisation and precision), the probe's and the training settings, the workers and the seed."""
    payload = {"base": base_digest, "pool": pool_entry, "probe": job.partitioning.selection.probe.model_dump(),
               "training": job.training.model_dump(mode="json"), "loss_beta": job.loss.beta,
               "workers": job.scaling.num_workers, "seed": job.seed, "version": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def train_probe(job: JobConfig, out: str, *, pool: caching.CacheEntry, content_keys: np.ndarray,
                base_digest: str | None, settings: Any, resources: Any, log: Callable[[str], None]) -> str:
    """The probe stage's model directory: from the cache, or trained now (from the base model, with the
    pool's base pass as the precomputed reference) and cached."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdpo.ingest import split_dataset
    from sdpo.losses import resolve_options
    from sdpo.pipeline import drop_other_runs, stage_config, write_stage_model
    from sdpo.plan import BASE, StagePlan, steps_per_epoch, train_run_name, train_run_prefix
    from sdpo.worker import STAGE_METRICS, STEP_LOG, TRAIN_STATE, stage_loop

    probe, t = job.partitioning.selection.probe, job.training
    key = probe_key(job, base_digest, pool.key) if base_digest and pool.key else None
    root = storage.join(settings.cache_dir, "probes", key) if key else storage.join(out, "probe")
    model = storage.join(root, "model")
    if key and caching.read_marker(root) and storage.isdir(model):
        log(f"probe stage: cache hit ({model}); not retrained")
        return model
    caching.clear(root)
    n = int(ranking.content_share(content_keys, probe.fraction).sum())
    world = job.scaling.num_workers
    stage = StagePlan(
        index=0, partition="_probe", num_pairs=n, reference=BASE, init=BASE, beta=probe.beta or job.loss.beta,
        learning_rate=probe.learning_rate or t.learning_rate, loss="sigmoid", loss_options=resolve_options("sigmoid", {}),
        epochs=probe.epochs, steps_per_epoch=steps_per_epoch(n, world, t.batch_size, t.gradient_accumulation_steps),
    )
    # keyed, an interrupted probe resumes from its checkpoints; unkeyed (the base model's digest is
    # unknown), its inputs cannot be compared, so it starts afresh
    run_name = train_run_name(job.name, 0, key or "uncached")
    drop_other_runs(storage.join(out, "ray"), train_run_prefix(job.name, 0), keep=run_name if key else "", log=log)
    cfg = stage_config(job, stage, job.model.path, job.model.path, resources.torch_threads)
    cfg |= {"reference_mode": "precompute", "checkpoint_every": None, "inject_fault": None}
    dataset = split_dataset(storage.join(out, "data"), "_probe", num_pairs=n, world_size=world,
                            shuffle_seed=job.seed * 1000, reference=pool.path,
                            content_fraction=probe.fraction if probe.fraction < 1 else None)
    trainer = TorchTrainer(
        stage_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker=resources.per_worker),
        run_config=RunConfig(name=run_name, storage_path=storage.join(out, "ray")),
        datasets={"train": dataset}, dataset_config=DataConfig(),
    )
    log(f"probe stage: training on {n} pairs for {stage.total_steps} steps (cache miss)")
    result = trainer.fit()
    digest = write_stage_model(result.checkpoint, model, root, (STEP_LOG, STAGE_METRICS), TRAIN_STATE)
    steps = storage.read_json(storage.join(root, STAGE_METRICS))["steps"]
    if steps != stage.total_steps:
        raise RuntimeError(f"the probe stage ran {steps} optimiser steps, planned {stage.total_steps}")
    if key:
        caching.write_marker(root, {"key": key, "model_digest": digest, "pairs": n, "steps": stage.total_steps})
    return model


# --------------------------------------------------------------------------------------------------
# The driver's side
# --------------------------------------------------------------------------------------------------
def score_rows(job: JobConfig, out: str, keys: dict[str, tuple[np.ndarray, ...]], *, settings: Any,
               resources: Any, log: Callable[[str], None]) -> tuple[dict, ranking.ScoreTable, dict]:
    """The pool's passes (and probe); returns the keys with each row's ordering score (k[4]) and
    learnability (k[5]) filled in, the score table for the write pass, and what to record in the summary."""
    from sdpo.caching import model_digest, multiset_digest
    from sdpo.passes import scored_split

    ev = job.data.eval
    eval_cut = {s: eval_cutoff(k[0], ev.fraction, ev.max_pairs_per_source)[0] for s, k in keys.items()}
    pool_ck = np.concatenate([k[2][k[0] >= eval_cut[s]] for s, k in keys.items()])
    digest = multiset_digest(pool_ck)
    data_dir = storage.join(out, "data")

    def scored(model: str, role: str, revision: str | None = None) -> caching.CacheEntry:
        e = scored_split(None, rows=pool_rows(data_dir, eval_cut), model=model,
                         model_digest=model_digest(model, revision),
                         data_digest=digest, num_rows=len(pool_ck), settings=settings,
                         uncached_dir=storage.join(out, "scores", f"pool-{role}"), log=log)
        log(f"{role} pass on the {len(pool_ck)} training pairs: cache {e.status} {e.path}")
        return e

    base = scored(job.model.path, "base", job.model.revision)
    init = read_scores(base.path)
    p = job.partitioning
    gammas = {name: ranking.margin(init["chosen_logps"], init["rejected_logps"], init["chosen_tokens"],
                                   init["rejected_tokens"], per_token=per_token)
              for name, per_token in (("gamma", False), ("gamma_per_token", True))}
    columns = gammas | {"difficulty": gammas["gamma_per_token" if p.difficulty == "margin_per_token" else "gamma"]}
    info: dict[str, Any] = {"base_pass": base.to_dict()}
    sel = p.selection
    if sel.strategy == "learnability_top":
        probe_model = train_probe(job, out, pool=base, content_keys=pool_ck, base_digest=model_digest(job.model.path, job.model.revision),
                                  settings=settings, resources=resources, log=log)
        probe = scored(probe_model, "probe")
        ft = read_scores(probe.path)
        if not np.array_equal(ft["content_key"], init["content_key"]):
            raise RuntimeError("the probe pass scored other pairs than the base pass")
        columns["learnability"] = ranking.learnability(init, ft, loss=sel.loss, beta=sel.probe.beta or job.loss.beta)
        info |= {"probe_model": probe_model, "probe_pass": probe.to_dict()}
    table = ranking.ScoreTable(init["content_key"], columns)
    by_model = p.strategy in (SplitStrategy.easy_to_hard, SplitStrategy.hard_to_easy)
    extended = {s: (*k[:4], table.get("difficulty", k[2]) if by_model else k[4], table.get("learnability", k[2]))
                for s, k in keys.items()}
    return extended, table, info


def split(job: JobConfig, out: str, keys: dict, settings: Any, resources: Any,
           log: Callable[[str], None]) -> tuple[Any, dict, Any, dict]:
    """The partition spec; for score strategies and selections, after the pool's scoring passes (and
    probe), which also give each row's scores (`pair_scores`). Returns (spec, keys, score table, record)."""
    from sdpo.partition import plan_partitions

    p = job.partitioning
    table, info = None, {}
    if needs_model(job):
        keys, table, info = score_rows(job, out, keys, settings=settings, resources=resources, log=log)
    selecting = p.selection.strategy == "learnability_top"
    spec = plan_partitions(
        {name: k[:2] for name, k in keys.items()}, strategy=p.strategy.value, order=p.order, num_parts=p.num_parts,
        proportions=p.proportions, eval_fraction=job.data.eval.fraction, eval_cap=job.data.eval.max_pairs_per_source,
        scores={n: k[4] for n, k in keys.items()} if p.strategy.by_score else None,
        descending=descending(job), within_source=p.within_source,
        learn={n: k[5] for n, k in keys.items()} if selecting else None,
        keep_fraction=p.selection.top_fraction if selecting else None,
    )
    if p.strategy.by_score and table is None:  # score_column: the rows' own scores, no model pass
        table = ranking.ScoreTable(np.empty(0, np.int64), {})
    return spec, keys, table, info


def record(job: JobConfig, out: str, data_dir: str, spec: Any, keys: dict, log: Callable[[str], None]) -> dict:
    """What summary.json records of the ordering and the selection: score histograms per stage, and the
    dropped pairs (counted by source, listed in a file)."""
    p = job.partitioning
    out_record: dict[str, Any] = {"strategy": p.strategy.value, "descending": spec.descending,
                                  "histograms": histograms(spec, keys)}
    if p.selection.strategy == "learnability_top":
        dropped = sum(spec.dropped.values())
        path = write_dropped(out, data_dir, spec, p.selection.top_fraction)
        out_record["selection"] = {"strategy": p.selection.strategy, "top_fraction": p.selection.top_fraction,
                                   "loss": p.selection.loss, "kept": sum(spec.sizes) + sum(spec.unused.values()),
                                   "dropped": dropped, "dropped_by_source": spec.dropped, "dropped_pairs_file": path}
        log(f"selection learnability_top: kept {out_record['selection']['kept']} training pairs, dropped {dropped} "
            f"(listed in {path})")
    return out_record


def histograms(spec: Any, keys: dict[str, tuple[np.ndarray, ...]]) -> dict[str, dict[str, dict]]:
    """Per score ("score": what the stages are ordered by; "learnability"), per partition (and
    `_dropped`): a histogram on edges shared by all partitions, for the report."""
    from sdpo.ingest import DROPPED_SPLIT, assign_keys
    from sdpo.partition import DROPPED

    names = dict(enumerate(spec.names)) | {DROPPED: DROPPED_SPLIT}
    out: dict[str, dict[str, dict]] = {}
    for which, col in (("score", 4), ("learnability", 5)):
        values: dict[str, list[np.ndarray]] = {}
        for src, k in keys.items():
            if len(k) <= col:
                continue
            parts = assign_keys(spec, src, k)
            for p, name in names.items():
                values.setdefault(name, []).append(k[col][parts == p])
        pooled = {n: np.concatenate(v) for n, v in values.items()}
        finite = np.concatenate([v[np.isfinite(v)] for v in pooled.values()]) if pooled else np.empty(0)
        if not len(finite):
            continue
        edges = ranking.histogram(finite)["edges"]
        out[which] = {n: ranking.histogram(v, edges=np.asarray(edges)) for n, v in pooled.items() if len(v)}
    return out


def write_dropped(out: str, data_dir: str, spec: Any, top_fraction: float) -> str:
    """List the pairs the selection dropped (source, file, line, scores, reason) in `<out>/dropped_pairs.jsonl`,
    streamed from the partition files' `_dropped` split."""
    import ray.data

    from sdpo.ingest import DROPPED_SPLIT

    path = storage.join(out, DROPPED_FILE)
    split = f"{data_dir}/partitions/split={DROPPED_SPLIT}"
    reason = f"learnability_top: not among the top {top_fraction:.0%} of the training pairs by learnability"
    with storage.open_write(path) as f:
        if sum(spec.dropped.values()) and storage.isdir(split):
            cols = ["source", "file", "line", "learnability", "difficulty"]
            for batch in ray.data.read_parquet(split, columns=cols).iter_batches(batch_format="pyarrow"):
                for row in batch.to_pylist():
                    f.write(json.dumps(row | {"reason": reason}) + "\n")
    return path
