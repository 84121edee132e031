"""The inference passes, as Ray Data jobs: reference log-probs (cached), gamma, held-out evaluation.

Each pass is `read_parquet -> map_batches(PairScorer, actor pool) -> write_parquet`: the model is
loaded once per actor, batches stream through, nothing is collected in the driver but a float or two
per pair for the statistics (gamma's median needs the values).

- `scored_split`: one model over one split, content-addressed in the cache (see caching.py). The
  entry holds the split's rows plus `chosen_logps`, `rejected_logps` and token counts, so a stage
  trains straight from it (`ingest.split_dataset(reference=...)`).
- `extend_eval`: the held-out rows carry one pair of columns per model (`m0_` base, `m1_` stage 1,
  ...); after stage t only M_t is scored, and the stage's metrics read policy = m<t>, reference =
  m<t-1>, base = m0 from the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdpo import caching
from sdpo.diagnostics import EvalSums, Scored, eval_rows
from sdpo.plan import ScoringPlan
from sdpo.scoring import PairScorer

ROW_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
GROUP_COLUMNS = ["responses_ids", "rewards", "chosen_index", "rejected_index"]


@dataclass(frozen=True)
class PassSettings:
    plan: ScoringPlan
    batch_size: int
    cache_dir: str
    tokenization: dict  # what tokenised the rows (the content digest covers the result; this names it)
    revision: str | None = None
    trust_remote_code: bool = False


def _score(ds, model: Any, prefix: str, s: PassSettings, groups: bool = False):
    import ray.data

    p = s.plan
    return ds.map_batches(
        PairScorer,
        fn_constructor_kwargs={
            "model": model, "prefix": prefix, "precision": p.precision, "num_gpus": p.num_gpus,
            "threads": p.threads, "micro_batch": s.batch_size, "revision": s.revision,
            "trust_remote_code": s.trust_remote_code, "groups": groups,
        },
        batch_size=s.batch_size * 4,  # several micro-batches per call: length-sorting has room to work
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=p.actors),
        num_cpus=p.num_cpus,
        num_gpus=p.num_gpus,
    )


# --------------------------------------------------------------------------------------------------
# Cached scoring of a split (the reference pass, and the base model's pass for gamma)
# --------------------------------------------------------------------------------------------------
def scored_split(split_dir: str | None, *, model: Any, model_digest: str | None, data_digest: str, num_rows: int,
                 settings: PassSettings, uncached_dir: str, log: Callable[[str], None],
                 groups: bool = False, rows: Any = None, ordered: bool = False) -> caching.CacheEntry:
    """Score every pair of `split_dir` with `model`, or reuse the cached result of an identical pass.
    `groups`: score every response of each row's group too (listwise losses). `rows`: a Ray Dataset of
    the rows (ROW_COLUMNS and content_key) instead of `split_dir` (the training pool before the split);
    the entry is the same as a split's with the same pairs, so the two share the cache. `ordered`: the
    entry keeps each row's position (`ingest.ORDER_COLUMNS`) for a stage trained in stored order
    (`training.shuffle: false`), and is reused only where the same pairs sit at the same positions."""
    import ray.data

    from sdpo.ingest import ORDER_COLUMNS

    if ordered and rows is not None:
        raise ValueError("ordered entries are made from a split's directory, whose rows carry their positions")
    key = None
    if model_digest is not None:
        key = caching.pass_key(model=model_digest, data=data_digest, tokenization=settings.tokenization,
                               precision=settings.plan.precision, groups=groups,
                               order=order_digest(split_dir) if ordered else None)
    path = caching.entry_path(settings.cache_dir, key) if key else uncached_dir
    if key and (marker := caching.read_marker(path)) and marker.get("num_rows") == num_rows:
        return caching.CacheEntry(key, path, "hit", num_rows=num_rows)
    caching.clear(path)
    t0 = time.perf_counter()
    ds = rows if rows is not None else ray.data.read_parquet(
        split_dir, columns=ROW_COLUMNS + ["content_key"] + (list(ORDER_COLUMNS) if ordered else [])
        + (GROUP_COLUMNS if groups else []))
    _score(ds, model, "", settings, groups).write_parquet(path)
    seconds = time.perf_counter() - t0
    written = ray.data.read_parquet(path, columns=["content_key"]).count()
    if written != num_rows:
        raise RuntimeError(f"scoring pass wrote {written} rows to {path}, expected {num_rows}")
    entry = caching.CacheEntry(key, path, "miss" if key else "uncached", seconds, num_rows / seconds, num_rows)
    if key:
        caching.write_marker(path, {
            "key": key, "model": model_digest, "data": data_digest, "tokenization": settings.tokenization,
            "precision": settings.plan.precision, "scorer": caching.SCORER_VERSION, "num_rows": num_rows,
            "groups": groups,
            "seconds": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    return entry


def order_digest(split_dir: str) -> str:
    """The digest of a split's (pair, position) rows (`caching.position_keys`), read as a stream of four
    small columns: 8 bytes a pair in the driver, as the ingest's content keys."""
    import ray.data

    from sdpo.ingest import ORDER_COLUMNS

    parts = [caching.position_keys(b["content_key"], b["source_index"], b["file"].tolist(), b["line"])
             for b in ray.data.read_parquet(split_dir, columns=["content_key", *ORDER_COLUMNS]).iter_batches(
                 batch_format="numpy", batch_size=65536)]
    return caching.multiset_digest(np.concatenate(parts) if parts else np.zeros(0, np.int64))


def read_gamma(path: str) -> np.ndarray:
    """gamma = log pi(y_w|x) - log pi(y_l|x) for every pair of a scored split (one float per pair)."""
    import ray.data

    parts = [b["chosen_logps"] - b["rejected_logps"] for b in ray.data.read_parquet(
        path, columns=["chosen_logps", "rejected_logps"]).iter_batches(batch_format="numpy", batch_size=65536)]
    return np.concatenate(parts) if parts else np.zeros(0)


# --------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------
def extend_eval(input_dir: str, output_dir: str, *, model: Any, prefix: str, settings: PassSettings,
                first: bool) -> float:
    """Append `model`'s log-probs (`<prefix>chosen_logps`, ...) to the held-out rows; returns seconds."""
    import ray.data

    t0 = time.perf_counter()
    caching.clear(output_dir)
    columns = ROW_COLUMNS + ["source_index"] if first else None
    _score(ray.data.read_parquet(input_dir, columns=columns), model, prefix, settings).write_parquet(output_dir)
    caching.write_marker(output_dir, {"prefix": prefix, "model": str(model)})  # complete: a resume reuses it
    return time.perf_counter() - t0


def eval_complete(path: str) -> bool:
    """Whether a held-out score table was written to the end (`extend_eval` marks it last)."""
    return caching.read_marker(path) is not None


def eval_metrics(scores_dir: str, *, policy: str, reference: str, base: str, loss_type: str, beta: float,
                 options: dict, sources: list[str]) -> dict[str, float]:
    """Held-out metrics from the scored rows (column prefixes name the three models)."""
    import ray.data

    cols = ["source_index", "chosen_tokens", "rejected_tokens"] + [
        f"{p}{c}_logps" for p in {policy, reference, base} for c in ("chosen", "rejected")
    ]
    sums = EvalSums(sources)
    for b in ray.data.read_parquet(scores_dir, columns=cols).iter_batches(batch_format="numpy", batch_size=4096):
        def scored(p: str, b=b) -> Scored:
            return Scored(b[f"{p}chosen_logps"], b[f"{p}rejected_logps"])

        rows = eval_rows(scored(policy), scored(reference), scored(base), (b["chosen_tokens"], b["rejected_tokens"]),
                         loss_type=loss_type, beta=beta, options=options)
        sums.add(rows, b["source_index"])
    return sums.report()
