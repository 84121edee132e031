"""Ray Data ingest: read sources, quarantine bad rows, tokenise, split into partitions.

Two streaming passes, then the stages read their partitions straight from Parquet:

1. prepare: files -> rows {source, file, line, raw} -> `prepare_block` (parse, validate, render,
   tokenise, hash keys) -> `<out>/data/prepared/`. Bad rows keep their raw text and reason.
2. split: the driver collects the two hash keys of the valid rows (16 bytes a pair — never the rows
   themselves), computes the exact cut-offs (`partition.plan_partitions`), and a second pass writes
   `<out>/data/partitions/split=<name>/` (held-out rows under `split=_eval`). Score strategies and
   selections first score the training rows with a model (`pair_scores`, between the two passes) and
   cut on the scores; rows a selection drops go to `split=_dropped`.

Quarantined rows are streamed to `<out>/rejected_rows.jsonl` with source, file, line and reason.
Rows read and rows quarantined are also counted per file, so that a file which gave no rows (empty) or
no valid row (another format) can be named; the driver checks files before this pass (`inputs.py`).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import FileBasedDatasource

from sdpo.caching import ORDER_COLUMNS, content_key, mix64, multiset_digest
from sdpo.config import ConfigError
from sdpo.inputs import file_format
from sdpo.partition import DROPPED, EVAL, UNUSED, PartitionSpec, row_keys
from sdpo.ranking import ScoreTable, content_share
from sdpo.rows import RowError, RowMapping, prepare_record, user_score

EVAL_SPLIT = "_eval"
UNUSED_SPLIT = "_unused"
DROPPED_SPLIT = "_dropped"
_CHUNK = 8 << 20
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors write at the start of a file
_ROWS_PER_BLOCK = 2048
_ROWS_PER_SORT_PARTITION = 100_000


class DataError(ConfigError):
    """Data that cannot be trained on; raised before any training starts. A ConfigError, so that the
    CLI reports it the same way (`error: ...`, exit code 2)."""


def _data_error(err: BaseException | None, depth: int = 0) -> DataError | None:
    """The DataError a Ray task raised, from under Ray's wrappers (whose text is the whole trace).
    Its message is one line: the callers here raise it so."""
    if err is None or depth > 8:
        return None
    if type(err) is DataError:
        return err
    return _data_error(getattr(err, "cause", None), depth + 1) or _data_error(err.__cause__, depth + 1)


# --------------------------------------------------------------------------------------------------
# Reading: one row per JSON line / JSON array element / Parquet row, with its provenance
# --------------------------------------------------------------------------------------------------
def _block(source: str, path: str, lines: list[int], raws: list[str], problems: list[str] | None = None) -> pa.Table:
    """`problems`: per row, why it could not even be read ("" if it could); prepare_block quarantines it."""
    return pa.table({
        "source": pa.array([source] * len(lines), pa.string()),
        "file": pa.array([path] * len(lines), pa.string()),
        "line": pa.array(lines, pa.int64()),
        "raw": pa.array(raws, pa.large_string()),
        "problem": pa.array(problems or [""] * len(lines), pa.string()),
    })


def _decode_line(data: bytes) -> tuple[str, str]:
    """A line's text and "", or, for bytes that are not UTF-8, the text with the bad bytes escaped (for
    the quarantine file) and the reason. Lines are whole here, so a character split across read chunks is
    never mistaken for a bad one."""
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as err:
        return data.decode("utf-8", errors="backslashreplace"), f"not valid UTF-8 at byte {err.start} of the line"


class PreferenceFiles(FileBasedDatasource):
    """JSON Lines, JSON arrays and Parquet files as raw rows tagged with (source, file, line)."""

    def __init__(self, paths: list[str], *, source: str, fmt: str, **kwargs):
        super().__init__(paths, **kwargs)
        self._source, self._fmt = source, fmt

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = self._fmt
        if file_format(path, fmt) == "parquet":
            yield from self._read_parquet(f, path)
        else:
            yield from self._read_json(f, path, allow_array=fmt in ("json", "auto"))

    def _read_parquet(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        line = 0
        # Ray hands us a forward-only stream; Parquet needs random access (footer first).
        batches = pq.ParquetFile(pa.BufferReader(f.readall())).iter_batches(batch_size=_ROWS_PER_BLOCK)
        while True:
            try:  # the bytes are in memory: what fails now is the file, not the network
                batch = next(batches, None)
            except (OSError, ValueError) as err:  # ArrowInvalid, or a page that does not decode
                raise DataError(f"data.sources[{self._source}]: {path} is a corrupt Parquet file (reading from row "
                                f"{line + 1}: {str(err).strip().splitlines()[0]}); rewrite it or remove it") from None
            if batch is None:
                return
            rows = batch.to_pylist()
            raws = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
            yield _block(self._source, path, list(range(line + 1, line + 1 + len(rows))), raws)
            line += len(rows)

    def _read_json(self, f: pa.NativeFile, path: str, *, allow_array: bool) -> Iterator[pa.Table]:
        head = f.read(_CHUNK)
        if head.startswith(_BOM):
            head = head[len(_BOM):]
        if allow_array and head.lstrip()[:1] == b"[":  # one JSON array of objects
            try:
                data = json.loads(head + f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
                raise DataError(
                    f"data.sources[{self._source}]: {path} is not valid JSON{where} "
                    f"({getattr(err, 'msg', err)}); a JSON array is parsed as a whole, so one bad row spoils the "
                    "file: fix it, or write it as JSON Lines (one row a line), where a bad row is quarantined alone"
                ) from None
            raws = [json.dumps(r, ensure_ascii=False) for r in data]
            for i in range(0, len(raws), _ROWS_PER_BLOCK):
                chunk = raws[i:i + _ROWS_PER_BLOCK]
                yield _block(self._source, path, list(range(i + 1, i + 1 + len(chunk))), chunk)
            return
        lines, raws, problems, number, rest = [], [], [], 0, b""
        while head:
            *complete, rest = (rest + head).split(b"\n")
            for data in complete:
                number += 1
                if data.strip():  # blank lines are not rows
                    text, problem = _decode_line(data)
                    lines.append(number)
                    raws.append(text)
                    problems.append(problem)
            if len(lines) >= _ROWS_PER_BLOCK:
                yield _block(self._source, path, lines, raws, problems)
                lines, raws, problems = [], [], []
            head = f.read(_CHUNK)
        if rest.strip():
            text, problem = _decode_line(rest)
            lines.append(number + 1)
            raws.append(text)
            problems.append(problem)
        if lines:
            yield _block(self._source, path, lines, raws, problems)


# --------------------------------------------------------------------------------------------------
# Prepare: validate + tokenise (pure given a tokenizer; runs inside Ray Data tasks)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerSettings:
    path: str
    revision: str | None
    trust_remote_code: bool
    max_length: int
    max_prompt_length: int
    eos_id: int
    seed: int  # partition seed: the hash keys depend on it
    eval_seed: int
    roots: dict[str, str]  # source -> common folder of its files; a row's identity is its path below it
    score_field: str | None = None  # partitioning.score_field: read each row's own score (score_column)
    mappings: dict[str, RowMapping] = field(default_factory=dict)  # source -> its column mapping


def file_identity(path: str, root: str) -> str:
    """A file's name relative to its source's common folder: unique within the source, and the same
    whether the files sit on a laptop or in a bucket (so the split does not depend on where they are)."""
    folder = root if root.endswith("/") else root + "/"  # a folder, not a name's first letters: /d/a vs /d/ab
    rel = path[len(folder):].lstrip("/") if root and path.startswith(folder) else path
    return rel or os.path.basename(path)


def source_roots(files: dict[str, list[str]]) -> dict[str, str]:
    """Source -> the deepest folder holding all its files ("/d", "s3://bucket/data"); "" if they share none."""
    roots = {}
    for name, paths in files.items():
        schemes = {p.split("://", 1)[0] + "://" if "://" in p else "" for p in paths}
        scheme = schemes.pop() if len(schemes) == 1 else None
        try:  # whole path components; fails on a mix of absolute and relative paths
            common = posixpath.commonpath([posixpath.dirname(p[len(scheme):]) for p in paths]) \
                if scheme is not None else None
        except ValueError:
            common = None
        roots[name] = "" if common is None else scheme + common
    return roots


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    tok.model_max_length = 1 << 62  # we truncate ourselves; silence the "longer than maximum" warning
    return tok


def prepare_block(batch: pa.Table, settings: TokenizerSettings) -> pa.Table:
    """Raw rows -> token ids and hash keys; bad rows keep `raw` and get a `reason`."""
    tok = load_tokenizer(settings.path, settings.revision, settings.trust_remote_code)
    cols = {k: [] for k in ("reason", "raw", "prompt_ids", "chosen_ids", "rejected_ids", "responses_ids",
                            "rewards", "chosen_index", "rejected_index", "eval_key", "split_key", "content_key",
                            "num_tokens", "user_score")}
    problems = batch.column("problem").to_pylist() if "problem" in batch.column_names else [""] * batch.num_rows
    for src, path, line, raw, problem in zip(
            *(batch.column(c).to_pylist() for c in ("source", "file", "line", "raw")), problems, strict=True):
        name = file_identity(path, settings.roots[src])
        eval_key = row_keys(src, name, line, settings.eval_seed)[0]
        split_key = row_keys(src, name, line, settings.seed)[1]
        try:
            if problem:  # the reader could not decode it
                raise RowError(problem)
            pair = prepare_record(raw, tok, max_length=settings.max_length,
                                  max_prompt_length=settings.max_prompt_length, eos_id=settings.eos_id,
                                  mapping=settings.mappings.get(src))
            reason, ids, keep_raw = "", (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids), ""
            group = (pair.responses_ids, pair.rewards, pair.chosen_index, pair.rejected_index)
            score = user_score(raw, settings.score_field) if settings.score_field else float("nan")
        except RowError as err:
            reason, ids, keep_raw = str(err), ([], [], []), raw
            group, score = ([], [], 0, 1), float("nan")
        cols["user_score"].append(score)
        for col, value in zip(("prompt_ids", "chosen_ids", "rejected_ids"), ids, strict=True):
            cols[col].append(value)
        for col, value in zip(("responses_ids", "rewards", "chosen_index", "rejected_index"), group, strict=True):
            cols[col].append(value)
        cols["reason"].append(reason)
        cols["raw"].append(keep_raw)
        cols["eval_key"].append(eval_key)
        cols["split_key"].append(split_key)
        cols["content_key"].append(content_key(*ids, responses=group[0], rewards=group[1]))
        completions = group[0] or ids[1:]
        cols["num_tokens"].append(len(completions) * len(ids[0]) + sum(len(c) for c in completions))
    ids_type = pa.list_(pa.int32())
    return pa.table({
        "source": batch.column("source"), "file": batch.column("file"), "line": batch.column("line"),
        "reason": pa.array(cols["reason"], pa.string()),
        "raw": pa.array(cols["raw"], pa.large_string()),
        "prompt_ids": pa.array(cols["prompt_ids"], ids_type),
        "chosen_ids": pa.array(cols["chosen_ids"], ids_type),
        "rejected_ids": pa.array(cols["rejected_ids"], ids_type),
        "responses_ids": pa.array(cols["responses_ids"], pa.list_(ids_type)),
        "rewards": pa.array(cols["rewards"], pa.list_(pa.float64())),
        "chosen_index": pa.array(cols["chosen_index"], pa.int32()),
        "rejected_index": pa.array(cols["rejected_index"], pa.int32()),
        "eval_key": pa.array(cols["eval_key"], pa.int64()),
        "split_key": pa.array(cols["split_key"], pa.int64()),
        "content_key": pa.array(cols["content_key"], pa.int64()),
        "num_tokens": pa.array(cols["num_tokens"], pa.int64()),
        "user_score": pa.array(cols["user_score"], pa.float64()),
    })


SPECIAL_SPLITS = {EVAL: EVAL_SPLIT, UNUSED: UNUSED_SPLIT, DROPPED: DROPPED_SPLIT}


def assign_block(batch: pa.Table, spec: PartitionSpec, source_names: list[str],
                 scores: ScoreTable | None = None) -> pa.Table:
    """Each row's split, its source index and its scores (`difficulty`, `learnability` and whatever else
    `scores` holds: NaN where not computed), which stay with the run's partition files for inspection."""
    ck = batch.column("content_key").to_numpy()
    table = scores or ScoreTable(np.empty(0, np.int64), {})
    values = {name: table.get(name, ck) for name in ["difficulty", "learnability", *table.columns]}
    learn = values["learnability"]
    by_score = batch.column("user_score").to_numpy() if spec.strategy == "score_column" else values["difficulty"]
    parts = spec.assign(
        np.asarray(batch.column("source").to_pylist(), dtype=object),
        batch.column("eval_key").to_numpy(),
        batch.column("split_key").to_numpy(),
        by_score, learn,
    )
    names = [SPECIAL_SPLITS[p] if p < 0 else spec.names[p] for p in parts]
    index = {n: i for i, n in enumerate(source_names)}
    batch = batch.append_column("split", pa.array(names, pa.string())).append_column(
        "source_index", pa.array([index[s] for s in batch.column("source").to_pylist()], pa.int32()))
    for name, column in values.items():
        batch = batch.append_column(name, pa.array(column, pa.float64()))
    return batch


# --------------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------------
@dataclass
class IngestReport:
    rows: Counter = field(default_factory=Counter)  # source -> rows read
    valid: Counter = field(default_factory=Counter)  # source -> valid rows
    rejected: Counter = field(default_factory=Counter)  # (source, reason) -> rows
    tokens: int = 0
    files: dict[str, list[str]] = field(default_factory=dict)  # source -> its files
    capped: set[str] = field(default_factory=set)  # sources read with max_rows: later files may go unread
    file_rows: Counter = field(default_factory=Counter)  # file -> rows read
    file_rejected: Counter = field(default_factory=Counter)  # file -> rows quarantined

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def _read(self, path: str) -> int:
        # Ray may hand a remote file's path to the reader without its scheme
        return self.file_rows[path] or self.file_rows[path.split("://", 1)[-1]]

    @property
    def empty_files(self) -> dict[str, list[str]]:
        """Source -> files that gave no row (0 bytes, blank lines only, no Parquet rows); capped sources skipped."""
        out = {src: [p for p in paths if not self._read(p)] for src, paths in self.files.items()
               if src not in self.capped}
        return {src: paths for src, paths in out.items() if paths}

    def all_rejected_files(self) -> list[tuple[str, int]]:
        """(file, rows) for every file each of whose rows was quarantined: most likely another format."""
        return sorted((f, n) for f, n in self.file_rows.items() if n and self.file_rejected[f] == n)

    def to_dict(self) -> dict:
        by_source: dict[str, dict] = {}
        for (src, reason), n in sorted(self.rejected.items()):
            by_source.setdefault(src, {})[reason] = n
        return {
            "rows": dict(self.rows), "valid": dict(self.valid), "rejected": self.total_rejected,
            "rejected_by_source_and_reason": by_source, "empty_files": self.empty_files,
        }


# --------------------------------------------------------------------------------------------------
# Driver side: the two passes and the per-stage datasets
# --------------------------------------------------------------------------------------------------
def read_sources(sources: list, files: dict[str, list[str]]):
    """One Ray Dataset of raw rows from every source (each may be capped by `max_rows`)."""
    import ray.data

    parts = []
    for src in sources:
        ds = ray.data.read_datasource(PreferenceFiles(files[src.name], source=src.name, fmt=src.format))
        parts.append(ds.limit(src.max_rows) if src.max_rows else ds)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def prepare(sources: list, files: dict[str, list[str]], data_dir: str, settings: TokenizerSettings,
            rejected_path: str) -> tuple[IngestReport, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Pass 1: tokenise everything to `<data_dir>/prepared`, quarantine bad rows, collect hash keys.

    Returns, per source, the valid rows' (eval keys, split keys, content keys, has explicit rewards,
    own score or NaN): 33 bytes a pair.
    """
    import ray.data

    prepared = f"{data_dir}/prepared"
    try:
        read_sources(sources, files).map_batches(
            prepare_block, fn_kwargs={"settings": settings}, batch_format="pyarrow", batch_size=256
        ).write_parquet(prepared)
    except Exception as err:
        cause = _data_error(err)
        if cause is None:
            raise
        raise DataError(str(cause).splitlines()[0]) from None  # Ray appends its retry notes

    report = IngestReport(files={s.name: list(files[s.name]) for s in sources},
                          capped={s.name for s in sources if s.max_rows})
    keys: dict[str, tuple[list, ...]] = {s.name: ([], [], [], [], []) for s in sources}
    cols = ["source", "file", "line", "reason", "raw", "eval_key", "split_key", "content_key", "num_tokens",
            "rewards", "user_score"]
    # No rows at all write no files: the driver's checks name the sources (pipeline._check_rejections).
    from sdpo import storage

    batches = ray.data.read_parquet(prepared, columns=cols).iter_batches(batch_format="pyarrow") \
        if storage.isdir(prepared) else []  # local or a bucket

    with storage.open_write(rejected_path) as out:
        for batch in batches:
            reasons = batch.column("reason").to_pylist()
            bad = [i for i, r in enumerate(reasons) if r]
            report.file_rows.update(batch.column("file").to_pylist())
            for i in bad:
                row = {c: batch.column(c)[i].as_py() for c in ("source", "file", "line", "reason", "raw")}
                report.rejected[(row["source"], row["reason"])] += 1
                report.file_rejected[row["file"]] += 1
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            ok = np.array([not r for r in reasons], dtype=bool)
            srcs = np.asarray(batch.column("source").to_pylist(), dtype=object)
            report.rows.update(srcs.tolist())
            ek, sk = batch.column("eval_key").to_numpy(), batch.column("split_key").to_numpy()
            ck = batch.column("content_key").to_numpy()
            scored = np.asarray(pc.list_value_length(batch.column("rewards")).to_numpy(zero_copy_only=False)) > 0
            report.tokens += int(batch.column("num_tokens").to_numpy()[ok].sum())
            for name in np.unique(srcs[ok]):
                sel = ok & (srcs == name)
                keys[name][0].append(ek[sel])
                keys[name][1].append(sk[sel])
                keys[name][2].append(ck[sel])
                keys[name][3].append(scored[sel])
                keys[name][4].append(batch.column("user_score").to_numpy()[sel])
                report.valid[name] += int(sel.sum())
    empty = (np.int64, np.int64, np.int64, bool, np.float64)
    as_arrays = {
        name: tuple(np.concatenate(k) if k else np.empty(0, empty[i]) for i, k in enumerate(pair))
        for name, pair in keys.items()
    }
    return report, as_arrays


def assign_keys(spec: PartitionSpec, src: str, k: tuple[np.ndarray, ...]) -> np.ndarray:
    """The partition of each of a source's valid rows from what the driver holds: the keys and, for score
    strategies and selections, the per-row score (k[4]: own score or gamma) and learnability (k[5])."""
    return spec.assign(np.full(len(k[0]), src, dtype=object), k[0], k[1], k[4], k[5] if len(k) > 5 else None)


def partition_digests(spec: PartitionSpec, keys: dict[str, tuple[np.ndarray, ...]]) -> dict[str, str]:
    """Content digest of every partition and of the held-out split (the pairs' token ids, any order)."""
    members: dict[str, list[np.ndarray]] = {}
    for src, k in keys.items():
        parts, ck = assign_keys(spec, src, k), k[2]
        for p in np.unique(parts):
            if p in (UNUSED, DROPPED):
                continue
            members.setdefault(EVAL_SPLIT if p == EVAL else spec.names[p], []).append(ck[parts == p])
    return {name: multiset_digest(np.concatenate(arrs)) for name, arrs in members.items()}


def missing_rewards(spec: PartitionSpec, keys: dict[str, tuple[np.ndarray, ...]]) -> dict[str, dict[str, int]]:
    """Per partition, per source: how many of its pairs carry no explicit rewards."""
    out: dict[str, dict[str, int]] = {}
    for src, k in keys.items():
        parts, scored = assign_keys(spec, src, k), k[3]
        for p in np.unique(parts[~scored]):
            if p not in (UNUSED, EVAL, DROPPED):
                out.setdefault(spec.names[p], {})[src] = int(((parts == p) & ~scored).sum())
    return out


def write_partitions(data_dir: str, spec: PartitionSpec, source_names: list[str],
                     scores: ScoreTable | None = None) -> None:
    """Pass 2: `<data_dir>/partitions/split=<name>/` for every partition, `split=_eval` for held-out rows,
    `split=_dropped` for the rows a selection dropped. `scores`: the per-pair scores by content key."""
    import ray.data
    from ray.data.expressions import col

    ray.data.read_parquet(f"{data_dir}/prepared").filter(expr=col("reason") == "").drop_columns(
        ["raw", "reason"]
    ).map_batches(
        assign_block, fn_kwargs={"spec": spec, "source_names": source_names, "scores": scores},
        batch_format="pyarrow"
    ).write_parquet(f"{data_dir}/partitions", partition_cols=["split"])


def _content_share(batch: pa.Table, fraction: float) -> pa.Table:
    return batch.filter(pa.array(content_share(batch.column("content_key").to_numpy(), fraction)))


def tag_rows(batch: pa.Table, *, column: str, tag: str) -> pa.Table:
    """`batch` with a constant string column (`passes.score_targets` tags each target's rows)."""
    return batch.append_column(column, pa.array([tag] * batch.num_rows, pa.string()))


def _with_weight(batch: pa.Table, weight: float) -> pa.Table:
    return batch.append_column("weight", pa.array(np.full(batch.num_rows, weight, np.float32)))


def _with_order(batch: pa.Table, seed: int) -> pa.Table:
    """A seeded pseudo-random sort key from each pair's content (splitmix64 of content_key ^ seed)."""
    x = batch.column("content_key").to_numpy().astype(np.uint64) ^ np.uint64(seed & (2**64 - 1))
    with np.errstate(over="ignore"):
        x = mix64(x + np.uint64(0x9E3779B97F4A7C15))
    return batch.append_column("_order", pa.array((x >> np.uint64(1)).astype(np.int64)))



def split_dataset(data_dir: str, split: str, *, num_pairs: int, world_size: int, shuffle_seed: int | None,
                  with_source: bool = False, reference: str | None = None, groups: bool = False,
                  content_fraction: float | None = None):
    """A partition as a Ray Dataset, padded with zero-weight rows to a multiple of `world_size`: in a
    seeded shuffled order, or with `shuffle_seed=None` in its rows' positions in the sources.

    With `reference` (a scored entry of this partition, see passes.py) the rows come from there and
    carry `ref_chosen_logps`, `ref_rejected_logps` and the completion token counts. With `groups`
    (listwise losses) the rows also carry their K responses, rewards and, from a reference entry scored
    with groups, `ref_group_logps` and `group_tokens`.

    Ray Train shards with `streaming_split(equal=True)`, which would drop up to world_size - 1 rows;
    padding makes the split exact, and the zero weights keep the padding out of every gradient and
    metric (see training.py).
    """
    import ray.data

    keep = ["source_index"] if with_source else []
    ordered = shuffle_seed is None  # the stored order: the rows carry their position (ORDER_COLUMNS)
    positions = [c for c in ORDER_COLUMNS if ordered and c not in keep]  # read to sort on, then dropped
    columns = ["prompt_ids", "chosen_ids", "rejected_ids", "content_key"] + keep + positions
    if groups:
        columns += ["responses_ids", "rewards", "chosen_index", "rejected_index"]
    if reference is None:
        base = ray.data.read_parquet(f"{data_dir}/partitions/split={split}", columns=columns)
    else:
        scored = ["chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"]
        scored += ["group_logps", "group_tokens"] if groups else []
        base = ray.data.read_parquet(reference, columns=columns + scored).rename_columns(
            {"chosen_logps": "ref_chosen_logps", "rejected_logps": "ref_rejected_logps"}
            | ({"group_logps": "ref_group_logps"} if groups else {}))
    if content_fraction is not None:  # a seeded-by-content share of the rows (the probe stage's `fraction`)
        base = base.map_batches(_content_share, fn_kwargs={"fraction": content_fraction}, batch_format="pyarrow")
    # The order is a function of the pairs (and the seed) alone, not of how files or blocks happen to be
    # laid out — Ray's Parquet writer keeps no row order — so it is one distributed sort either way:
    # shuffled, on a seeded key from each pair's content (the cost of a random_shuffle); `shuffle: false`,
    # on each row's position in its sources (ORDER_COLUMNS: sources as listed, files by name, lines).
    ds = base
    if ordered:
        ds = ds.sort(list(ORDER_COLUMNS)).drop_columns(positions)
    else:
        # The key is uniform on [0, 2^63): even boundaries need no sampling pass and no 200-way default.
        parts = max(2, -(-num_pairs // _ROWS_PER_SORT_PARTITION))
        bounds = [(i << 63) // parts for i in range(1, parts)]
        ds = ds.map_batches(_with_order, fn_kwargs={"seed": shuffle_seed}, batch_format="pyarrow").sort(
            "_order", boundaries=bounds)
        ds = ds.drop_columns(["_order"])
    ds = ds.drop_columns(["content_key"]).map_batches(_with_weight, fn_kwargs={"weight": 1.0}, batch_format="pyarrow")
    pad = (-num_pairs) % world_size
    while pad > 0:  # a partition smaller than the padding needs its rows more than once
        take = min(pad, num_pairs)
        ds = ds.union(base.limit(take).drop_columns(["content_key"] + positions).map_batches(_with_weight, fn_kwargs={"weight": 0.0}, batch_format="pyarrow"))
        pad -= take
    return ds
