"""The inference passes, as Ray Data jobs: reference log-probs (cached), gamma, held-out evaluation.

Each pass is `read_parquet -> map_batches(PairScorer, actor pool) -> write_parquet`: the model is
loaded once per actor, batches stream through, nothing is collected in the driver but a float or two
per pair for the statistics (gamma's median and the held-out metrics need the values).

- `scored_split`: one model over one split, content-addressed in the cache (see caching.py). The
  entry holds the split's rows plus `chosen_logps`, `rejected_logps` and token counts, so a stage
  trains straight from it (`ingest.split_dataset(reference=...)`).
- `score_targets`: one model over several splits in a single pass (one actor start and one model load
  instead of one per split): the rows are read with the same columns, tagged with their target, scored
  together and written partitioned by the tag; each target's folder is then moved into place. The
  pipeline uses it for the passes that load the same model — the held-out pass of stage t's model and
  stage t+1's reference pass, the base model's held-out pass and its passes over the partitions.
- held-out evaluation: one table per model, each the held-out rows with that model's log-probs, cached
  like a split's entry (keyed by the rows' positions too, so a hit carries this run's sources and
  lines); a stage's metrics join the tables of its policy, reference and base on the rows' positions
  (`eval_metrics`).
"""

from __future__ import annotations

import posixpath
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
    layout: str = "shared"  # the training's (plan.training_layout): under bf16 the values depend on it


def _score(ds, model: Any, prefix: str, s: PassSettings, groups: bool = False):
    import ray.data

    p = s.plan
    return ds.map_batches(
        PairScorer,
        fn_constructor_kwargs={
            "model": model, "prefix": prefix, "precision": p.precision, "num_gpus": p.num_gpus,
            "threads": p.threads, "micro_batch": s.batch_size, "revision": s.revision,
            "trust_remote_code": s.trust_remote_code, "groups": groups, "layout": s.layout,
        },
        batch_size=s.batch_size * 4,  # several micro-batches per call: length-sorting has room to work
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=p.actors),
        num_cpus=p.num_cpus,
        num_gpus=p.num_gpus,
    )


# --------------------------------------------------------------------------------------------------
# Scoring several splits in one pass
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One output of a pass: the rows of the split folder `source`, scored into the folder `path`.
    `num_rows`: the rows it must hold afterwards. `marker`: written into `path` once it is complete
    (a cache entry's metadata; the held-out table's), with the pass's seconds and time added.
    `what`: how the log names it."""

    source: str
    path: str
    num_rows: int
    marker: dict | None = None
    what: str = ""


SCORE_COLUMNS = ROW_COLUMNS + ["content_key", *caching.ORDER_COLUMNS]  # a split's rows, scored together
TARGET_COLUMN = "_target"


@dataclass
class PassRun:
    """What `score_targets` did: `scored`, the targets this pass scored, in `seconds`; `waited`, the cache
    entries another process (a concurrent trial or run) was scoring, now complete and left as it wrote them."""

    seconds: float
    scored: list[Target]
    waited: list[Target]


def _complete(path: str, num_rows: int) -> bool:
    """Whether the entry at `path` is marked complete with `num_rows` rows."""
    marker = caching.read_marker(path)
    return marker is not None and marker.get("num_rows") == num_rows


def score_targets(model: Any, targets: list[Target], settings: PassSettings, *, work_dir: str,
                  columns: list[str] | None = None, rows: Any = None, groups: bool = False,
                  poll: float = 1.0) -> PassRun:
    """Score every target's rows with `model` in one Ray Data pass, each cache entry exactly once across
    the processes that share the cache.

    A target that is a cache entry (its marker has a key) is scored under that entry's lease
    (`<entry>.lock`, see locks.py): trials of a search and runs sharing a cache often need the same entry
    at once (the base model's held-out pass, stage 1's reference pass), and two writers in one folder
    would mix their files. An entry whose lease another live process holds is waited for after this
    pass (never while holding a lease, so two processes cannot wait on each other); if its holder fails
    or dies instead, it is scored here."""
    from sdpo.locks import Lease, wait_while_held

    run, pending = PassRun(0.0, [], []), list(targets)
    while pending:
        mine, leases, theirs = [], [], []
        for t in pending:
            if not (t.marker and t.marker.get("key")):
                mine.append(t)  # this run's own folder
                continue
            lease = Lease(f"{t.path.rstrip('/')}.lock")
            if not lease.acquire():
                theirs.append((t, lease))
            elif _complete(t.path, t.num_rows):  # completed by another process since the caller looked
                lease.release()
                run.waited.append(t)
            else:
                mine.append(t)
                leases.append(lease)
        try:
            if mine:
                run.seconds += _score_now(model, mine, settings, work_dir=work_dir, columns=columns, rows=rows,
                                          groups=groups)
                run.scored += mine
        finally:
            for lease in leases:
                lease.release()
        pending = [t for t, lease in theirs
                   if not wait_while_held(lease, lambda t=t: _complete(t.path, t.num_rows), poll=poll)]
        run.waited += [t for t, _ in theirs if t not in pending]  # the rest: their holder stopped; ours now
    return run


def _score_now(model: Any, targets: list[Target], settings: PassSettings, *, work_dir: str,
               columns: list[str] | None, rows: Any, groups: bool) -> float:
    """One Ray Data pass over `targets` (see `score_targets`); returns its seconds.

    One target is read (`columns`, or a Ray Dataset `rows`), scored and written straight to its path.
    Several are read with `SCORE_COLUMNS`, each row tagged with its target, unioned and scored by one
    actor pool, written under `work_dir` partitioned by the tag, and each partition folder moved to its
    target's path. Every target is then checked to hold `num_rows` rows and marked complete."""
    import ray.data

    from sdpo import storage
    from sdpo.ingest import tag_rows

    if len(targets) > 1 and (groups or rows is not None or columns is not None):
        raise ValueError("only plain pair passes over split folders can be scored together")
    t0 = time.perf_counter()
    for t in targets:
        caching.clear(t.path)
    if len(targets) == 1:
        t = targets[0]
        ds = rows if rows is not None else ray.data.read_parquet(t.source, columns=columns or SCORE_COLUMNS)
        _score(ds, model, "", settings, groups).write_parquet(t.path)
    else:
        caching.clear(work_dir)
        parts = [ray.data.read_parquet(t.source, columns=SCORE_COLUMNS).map_batches(
            tag_rows, fn_kwargs={"column": TARGET_COLUMN, "tag": f"t{i}"}, batch_format="pyarrow")
            for i, t in enumerate(targets)]
        _score(parts[0].union(*parts[1:]), model, "", settings).write_parquet(work_dir, partition_cols=[TARGET_COLUMN])
        for i, t in enumerate(targets):
            part = storage.join(work_dir, f"{TARGET_COLUMN}=t{i}")
            if storage.isdir(part):
                storage.move_dir(part, t.path)
        caching.clear(work_dir)
    seconds = time.perf_counter() - t0
    for t in targets:
        written = ray.data.read_parquet(t.path, columns=["content_key"]).count() if storage.isdir(t.path) else 0
        if written != t.num_rows:
            raise RuntimeError(f"scoring pass wrote {written} rows to {t.path}, expected {t.num_rows}")
        if t.marker is not None:
            caching.write_marker(t.path, t.marker | {"seconds": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return seconds


# --------------------------------------------------------------------------------------------------
# Cached scoring of a split (the reference pass, and the base model's pass for gamma)
# --------------------------------------------------------------------------------------------------
def split_target(split_dir: str | None, *, model_digest: str | None, data_digest: str, num_rows: int,
                 settings: PassSettings, uncached_dir: str, groups: bool = False,
                 ordered: bool = False, order: str | None = None) -> caching.CacheEntry | Target:
    """The cache entry of this pass if it is complete (status "hit"), else the `Target` that scores it
    (its marker is the entry's metadata; None where the model's digest is unknown: not cacheable).
    `order`: the split's `order_digest` where the caller has it (implies `ordered`)."""
    key = None
    if model_digest is not None:
        if ordered and order is None:
            order = order_digest(split_dir)
        key = caching.pass_key(model=model_digest, data=data_digest, tokenization=settings.tokenization,
                               precision=settings.plan.precision, groups=groups, order=order,
                               layout=settings.layout)
    path = caching.entry_path(settings.cache_dir, key) if key else uncached_dir
    if key and _complete(path, num_rows):
        return caching.CacheEntry(key, path, "hit", num_rows=num_rows)
    meta = None
    if key:
        meta = {"key": key, "model": model_digest, "data": data_digest, "tokenization": settings.tokenization,
                "precision": settings.plan.precision, "scorer": caching.SCORER_VERSION, "num_rows": num_rows,
                "groups": groups, "layout": settings.layout}
    return Target(split_dir or "", path, num_rows, meta)


def scored_split(split_dir: str | None, *, model: Any, model_digest: str | None, data_digest: str, num_rows: int,
                 settings: PassSettings, uncached_dir: str, log: Callable[[str], None],
                 groups: bool = False, rows: Any = None, ordered: bool = False) -> caching.CacheEntry:
    """Score every pair of `split_dir` with `model`, or reuse the cached result of an identical pass.
    `groups`: score every response of each row's group too (listwise losses). `rows`: a Ray Dataset of
    the rows (ROW_COLUMNS and content_key) instead of `split_dir` (the training pool before the split);
    the entry is the same as a split's with the same pairs, so the two share the cache. `ordered`: the
    entry keeps each row's position (`caching.ORDER_COLUMNS`) for a stage trained in stored order
    (`training.shuffle: false`), and is reused only where the same pairs sit at the same positions."""
    if ordered and rows is not None:
        raise ValueError("ordered entries are made from a split's directory, whose rows carry their positions")
    found = split_target(split_dir, model_digest=model_digest, data_digest=data_digest, num_rows=num_rows,
                         settings=settings, uncached_dir=uncached_dir, groups=groups, ordered=ordered)
    if isinstance(found, caching.CacheEntry):
        return found
    columns = ROW_COLUMNS + ["content_key"] + (list(caching.ORDER_COLUMNS) if ordered else []) + (GROUP_COLUMNS if groups else [])
    run = score_targets(model, [found], settings, work_dir="", columns=columns, rows=rows, groups=groups)
    key = found.marker["key"] if found.marker else None
    if run.waited:  # a concurrent trial or run scored this very entry: reuse it as a hit
        log(f"{found.path}: scored by another process sharing the cache; waited for it")
        return caching.CacheEntry(key, found.path, "hit", num_rows=num_rows)
    return caching.CacheEntry(key, found.path, "miss" if key else "uncached", run.seconds,
                              num_rows / run.seconds, num_rows)


def order_digest(split_dir: str) -> str:
    """The digest of a split's (pair, position) rows (`caching.position_keys`), read as a stream of four
    small columns: 8 bytes a pair in the driver, as the ingest's content keys."""
    import ray.data

    parts = [caching.position_keys(b["content_key"], b["source_index"], b["file"].tolist(), b["line"])
             for b in ray.data.read_parquet(split_dir, columns=["content_key", *caching.ORDER_COLUMNS]).iter_batches(
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
def eval_complete(path: str, model: str) -> bool:
    """Whether a held-out score table of `model` was written to the end (`score_targets` marks it last,
    naming the model it scored)."""
    marker = caching.read_marker(path)
    return marker is not None and marker.get("model") == model


EVAL_TABLE_COLUMNS = ["content_key", *caching.ORDER_COLUMNS, "chosen_tokens", "rejected_tokens", "chosen_logps",
                      "rejected_logps"]


def _eval_table(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A held-out table's per-pair numbers (no token ids), sorted by the rows' position keys."""
    import ray.data

    parts = list(ray.data.read_parquet(path, columns=EVAL_TABLE_COLUMNS).iter_batches(
        batch_format="numpy", batch_size=65536))
    cols = {c: np.concatenate([b[c] for b in parts]) if parts else np.zeros(0) for c in EVAL_TABLE_COLUMNS}
    keys = caching.position_keys(cols["content_key"], cols["source_index"], list(cols["file"]), cols["line"])
    order = np.argsort(keys, kind="stable")
    return keys[order], {c: v[order] for c, v in cols.items()}


def eval_metrics(tables: dict[str, str], *, loss_type: str, beta: float, options: dict,
                 sources: list[str]) -> dict[str, float]:
    """Held-out metrics from the score tables of the `policy`, `reference` and `base` models (keys of
    `tables`; one table may serve several). The tables hold the same rows in any order: they are joined
    on the rows' positions, a few numbers per pair in the driver."""
    loaded: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for path in tables.values():
        if path not in loaded:
            loaded[path] = _eval_table(path)
    (head, (keys, first)), *rest = loaded.items()
    for path, (other, _) in rest:
        if not np.array_equal(keys, other):
            raise RuntimeError(f"held-out tables {head} ({len(keys)} rows) and {path} ({len(other)} rows) do not "
                               f"hold the same rows; remove {posixpath.dirname(path)} to rescore them")

    def scored(role: str) -> Scored:
        cols = loaded[tables[role]][1]
        return Scored(cols["chosen_logps"], cols["rejected_logps"])

    sums = EvalSums(sources)
    rows = eval_rows(scored("policy"), scored("reference"), scored("base"),
                     (first["chosen_tokens"], first["rejected_tokens"]),
                     loss_type=loss_type, beta=beta, options=options)
    sums.add(rows, first["source_index"])
    return sums.report()
