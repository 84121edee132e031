"""Input checks that run in the driver before Ray starts: data files and the model folder. No Ray.

Cheap by design — what a listing, a Parquet footer and the first bytes of a small file tell:

- a path or glob matching nothing names the source, the pattern and what is there instead;
- a Parquet file that is not Parquet, or whose columns no preference format can use, is one error
  naming the file, its columns and the columns expected (rather than every row quarantined one by one);
- an empty file (0 bytes, blank lines only, `[]`, a Parquet file with 0 rows): a source whose files
  are *all* empty is an error; an empty file among non-empty ones is a warning, and the ingest pass
  counts it in the summary (`data.empty_files`). Spark and Ray Data write empty part files (and 0-byte
  `_SUCCESS` markers) routinely, so one empty shard among many must not stop a job; a source that
  reads nothing at all is always a mistake.
- a local model path that is missing, a file, or a folder without `config.json` or weights is named
  with what it holds, instead of transformers' hub-id error.

Rows that are individually bad are not this module's business: the ingest pass quarantines them.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sdpo.config import ConfigError

log = logging.getLogger(__name__)

EXPECTED = (
    "columns prompt + chosen + rejected (strings, or lists of {role, content} messages; optionally "
    "score_chosen + score_rejected; without prompt, chosen + rejected as whole conversations), or prompt + "
    "responses + rewards (K completions and K numbers); a source's `columns:` maps other names onto these"
)
_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "responses")
_SMALL = 64 << 10  # JSON files up to this size are read whole to tell whether they hold anything
_GLOB_CHARS = "*?["
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def file_format(path: str, fmt: str) -> str:
    """'parquet' or 'json' (JSON Lines or one JSON array): the source's `format`, or by extension."""
    if fmt == "auto":
        return "parquet" if path.endswith(".parquet") else "json"
    return "parquet" if fmt == "parquet" else "json"


def listing(items: list[str], n: int = 5) -> str:
    """The first `n` items, comma-separated, and how many more."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------
# Files: expand, then look at each one
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    path: str  # as the ingest reads it: a local path, or a URL with its scheme
    fs: Any  # the fsspec filesystem
    fs_path: str  # the path within `fs`
    size: int | None
    fmt: str  # 'parquet' or 'json'


def _protocol(fs: Any) -> str:
    return fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol


def expand(source: str, pattern: str, fmt: str) -> list[InputFile]:
    """The files a path or glob names (sorted); ConfigError naming the source and pattern if none."""
    import fsspec

    fs, _, matches = fsspec.get_fs_token_paths(pattern)
    infos = [i for i in (_info(fs, m) for m in matches) if i and i.get("type") == "file"]
    if not infos:
        raise ConfigError(f"data.sources[{source}].path: {pattern!r} matches no file: {_why_nothing(fs, pattern)}")
    protocol = _protocol(fs)
    local = protocol in ("file", "local")
    out = []
    for info in sorted(infos, key=lambda i: i["name"]):
        name = info["name"]
        path = name if local else f"{protocol}://{name}"
        out.append(InputFile(path, fs, name, info.get("size"), file_format(path, fmt)))
    return out


def _info(fs: Any, path: str) -> dict | None:
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


def _why_nothing(fs: Any, pattern: str) -> str:
    """What is at the pattern's place instead, in a few words (listing only local folders)."""
    path = fs._strip_protocol(pattern)
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=None)
    if cut is None:
        if fs.isdir(path):
            return f"it is a folder; give a glob such as {pattern.rstrip('/') + '/*.jsonl'!r}, or list the files"
        return "no such file; check the path"
    folder = path[:cut].rsplit("/", 1)[0] or "/"
    local = _protocol(fs) in ("file", "local")
    shown = folder if local else f"{_protocol(fs)}://{folder}"
    if not fs.isdir(folder):
        return f"the folder {shown!r} does not exist; check the path"
    if not local:  # listing a bucket prefix could take many requests
        return f"no file in {shown!r} matches; check the glob"
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False))
    held = f"it holds {listing(names)}" if names else "it is empty"
    return f"no file in {folder!r} matches ({held}); check the glob"


def _textual(t: Any) -> bool:
    """A string column (plain, large, view or dictionary-encoded) or a list column (messages, responses)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    kinds = ("is_string", "is_large_string", "is_string_view", "is_list", "is_large_list", "is_list_view")
    return any(getattr(pa.types, k, lambda _: False)(t) for k in kinds)


def _is_string(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


def parquet_problem(schema: Any, mapping: Any = None) -> str | None:
    """Why no row of a Parquet file with this Arrow schema could be used, or None if some could.
    With a source's `RowMapping`, its columns are looked up under the names the mapping gives them."""
    column = mapping.column if mapping is not None else (lambda field: field)
    names = set(schema.names)
    has = {f for f in ("prompt", "chosen", "rejected", "responses", "rewards") if column(f) in names}
    # without a prompt column, chosen/rejected lists are read as whole conversations (implicit prompt)
    implicit = "chosen" in has and not _is_string(schema.field(column("chosen")).type)
    pairs = {"chosen", "rejected"} <= has and ("prompt" in has or implicit)
    if not (pairs or {"prompt", "responses", "rewards"} <= has):
        renamed = f" (read through the source's columns {dict(mapping.columns)})" if mapping and mapping.columns else ""
        return f"it has columns {schema.names}{renamed}; expected {EXPECTED}"
    for field in _TEXT_COLUMNS:
        col = column(field)
        if field in has and not _textual(schema.field(col).type):
            return (f"column {col!r} has type {schema.field(col).type}, not text (a string or a list of "
                    f"{{role, content}} messages); expected {EXPECTED}")
    return None


def inspect_file(f: InputFile, mapping: Any = None) -> tuple[bool, str | None]:
    """(empty, problem) for one file: a Parquet footer, or the bytes of a small JSON file."""
    if f.size == 0:
        return True, None
    if f.fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with f.fs.open(f.fs_path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            return False, f"is not a readable Parquet file ({first_line(err)}); set the source's format if it is JSON"
        return meta.num_rows == 0, (None if meta.num_rows == 0 else parquet_problem(schema, mapping))
    if f.size is not None and f.size <= _SMALL:
        with f.fs.open(f.fs_path, "rb") as fh:
            return b"".join(fh.read().split()) in (b"", b"[]"), None
    return False, None


def check_source(source: str, files: list[InputFile], mapping: Any = None) -> list[str]:
    """Raise for files no row of which could be used, or if every file is empty; return the empty ones.

    Footers and small files are read in a thread pool: remote files cost one or two requests each.
    """
    if len(files) == 1:
        results = [inspect_file(files[0], mapping)]
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            results = list(pool.map(lambda f: inspect_file(f, mapping), files))
    bad = [f"{f.path}: {problem}" for f, (_, problem) in zip(files, results, strict=True) if problem]
    if bad:
        raise ConfigError(
            f"data.sources[{source}]: {len(bad)} file(s) hold no usable preference rows:\n  "
            + "\n  ".join(bad[:5]) + (f"\n  (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        )
    empty = [f.path for f, (is_empty, _) in zip(files, results, strict=True) if is_empty]
    if empty and len(empty) == len(files):
        raise ConfigError(
            f"data.sources[{source}]: every file it matches is empty (0 bytes, blank lines only or no rows): "
            f"{listing(empty)}; check the path or glob, or remove the source"
        )
    if empty:
        log.warning("data.sources[%s]: %d of %d files are empty and add no rows: %s",
                    source, len(empty), len(files), listing(empty))
    return empty


# --------------------------------------------------------------------------------------------------
# The model folder
# --------------------------------------------------------------------------------------------------
def looks_local(path: str) -> bool:
    """A path that cannot be a hub id ('name' or 'org/name'): it exists, or is absolute/relative-marked."""
    return os.path.exists(path) or path.startswith(("/", "~", ".")) or path.count("/") > 1


def local_dir_problem(path: str, *, model: bool, tokenizer: bool) -> str | None:
    """Why a local `path` is not a model and/or tokenizer folder, in words; None if it may be one."""
    path = os.path.expanduser(path)
    if not looks_local(path):
        return None
    if not os.path.exists(path):
        return "does not exist (and is not a hub id 'name' or 'org/name'); check the path"
    if not os.path.isdir(path):
        return "is a file; it must be a Hugging Face model folder (config.json, weights, tokenizer files)"
    names = sorted(os.listdir(path))
    if not names:
        return "is an empty folder; it must hold a Hugging Face model (config.json, weights, tokenizer files)"
    if model and "config.json" not in names:
        return f"has no config.json (it holds {listing(names)}); point it at a Hugging Face model folder"
    if model and not any(n in _WEIGHTS or n.endswith(".safetensors") for n in names):
        return (f"has no weights (it holds {listing(names)}); expected model.safetensors or pytorch_model.bin "
                "(or their sharded .index.json)")
    for name in (n for n in names if n.endswith(".safetensors")):
        problem = safetensors_problem(os.path.join(path, name))
        if problem:
            return f"has a broken weights file: {name} {problem}"
    if tokenizer and not any(n in _TOKENIZER_FILES for n in names):
        return (f"has no tokenizer files (it holds {listing(names)}); expected tokenizer.json or "
                "tokenizer_config.json (or set model.tokenizer)")
    return None


def safetensors_problem(path: str) -> str | None:
    """Reads only the header: a file that is not safetensors, or shorter than its header says (an
    interrupted download), is named here rather than deep in a worker's model load."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            return "is not a safetensors file (no valid header)"
        try:
            tensors = [t for k, t in json.loads(fh.read(n)).items() if k != "__metadata__"]
            end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "is not a safetensors file (its header is not a tensor table)"
    if 8 + n + end != size:
        return f"is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}"
    return None


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line: transformers' errors run to dozens of lines."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "…"
