"""Content addresses for inference passes: what a pass's result depends on, hashed. No Ray, no torch.

A scoring pass (reference log-probs, base-model log-probs) is a pure function of
- the model's weights (`model_digest`: the bytes of its weight files and config, or a hub commit),
- the pairs it scores (`content_key` per row, `multiset_digest` per partition: the token ids
  themselves, so any change of data, chat template, truncation or max_length shows up),
- the tokenisation settings and the precision of the pass, and the scorer's own version.
`pass_key` hashes exactly these; a cache entry lives at `<cache_dir>/scores/<key>/` and counts only
once its completion marker is written (last, atomically), so a crash mid-write is a miss, never a
half-read hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCORER_VERSION = "2"  # 2: shared-prompt layout, float64 sums. Bump when the scorer's numerics change: every old entry then misses
MARKER = "_COMPLETE.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MODEL_FILES = ("config.json", "generation_config.json")
# trainer state that sits beside weights in checkpoint folders: not the model
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state")


# --------------------------------------------------------------------------------------------------
# Data content
# --------------------------------------------------------------------------------------------------
def content_key(prompt: Iterable[int], chosen: Iterable[int], rejected: Iterable[int], *,
                responses: Iterable[Iterable[int]] = (), rewards: Iterable[float] = ()) -> int:
    """A 63-bit digest of one row's token ids (what a model actually scores) and its explicit rewards
    (K-response rows, scored pairs); a plain pair's key depends on its three id lists alone."""
    h = hashlib.blake2b(digest_size=8)
    for ids in (prompt, chosen, rejected):
        arr = np.asarray(list(ids), dtype=np.int32)
        h.update(len(arr).to_bytes(4, "little"))
        h.update(arr.tobytes())
    responses, rewards = [list(r) for r in responses], list(rewards)
    if responses or rewards:
        h.update(b"group" + len(responses).to_bytes(4, "little"))
        for ids in responses:
            arr = np.asarray(ids, dtype=np.int32)
            h.update(len(arr).to_bytes(4, "little"))
            h.update(arr.tobytes())
        h.update(np.asarray(rewards, dtype=np.float64).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


# A row's position in its sources, kept in the partitions (and in entries that keep positions):
# `training.shuffle: false` trains in this order, and `position_keys` hashes these columns.
ORDER_COLUMNS = ("source_index", "file", "line")


def position_keys(content_keys: np.ndarray, source_index: np.ndarray, files: list[str], lines: np.ndarray) -> np.ndarray:
    """One int64 per row for (its content, its source, file and line): `multiset_digest` of these names a
    set of pairs *and* where each one sits, so an entry that keeps positions is reused only in place."""
    names = {f: int.from_bytes(hashlib.sha256(f.encode()).digest()[:8], "little") for f in set(files)}
    x = mix64(np.asarray(content_keys, np.int64).astype(np.uint64) ^ np.array([names[f] for f in files], np.uint64))
    x = mix64(x ^ (np.asarray(source_index, np.uint64) << np.uint64(40)) ^ np.asarray(lines, np.uint64))
    return (x >> np.uint64(1)).astype(np.int64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def multiset_digest(keys: np.ndarray) -> str:
    """Order-independent digest of a set of rows' content keys (duplicates count)."""
    arr = np.sort(np.asarray(keys, dtype=np.int64))
    h = hashlib.sha256(len(arr).to_bytes(8, "little"))
    h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------------------
def model_digest(path: str, revision: str | None = None) -> str | None:
    """Digest of a model's weights: its weight and config files (local or any fsspec URL), or, for a
    hub id, the commit the revision resolves to. None when it cannot be determined (offline hub id)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        def counts(f: str) -> bool:
            name = posixpath.basename(f)
            if name in _MODEL_FILES:
                return True
            return f.endswith(_WEIGHT_SUFFIXES) and not name.startswith(_NOT_WEIGHTS)

        files = sorted(f for f in fs.find(root) if counts(f))
        if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
            return None
        h = hashlib.sha256()
        for f in files:
            h.update(posixpath.relpath(f, root).encode() + b"\0")
            with fs.open(f, "rb") as fh:
                while chunk := fh.read(16 << 20):
                    h.update(chunk)
        return "files:" + h.hexdigest()
    try:  # a hub id: the commit pins the weights
        from huggingface_hub import HfApi

        sha = HfApi().model_info(path, revision=revision).sha
        return f"hub:{path}@{sha}" if sha else None
    except Exception:  # offline, private, or not a hub id: not cacheable, never wrong
        return None


# --------------------------------------------------------------------------------------------------
# Keys and entries
# --------------------------------------------------------------------------------------------------
def pass_key(*, model: str, data: str, tokenization: dict[str, Any], precision: str, groups: bool = False,
             order: str | None = None, layout: str = "shared") -> str:
    """The cache key of one scoring pass. Every argument is an input of the result (`groups`: every
    response of K-response rows is scored, for the listwise losses; `order`: the entry also keeps each
    row's stored position, for `training.shuffle: false` — the digest of (pair, position) it was made from;
    `layout`: the pair layout, which changes the values beyond summation order only under bf16, so fp32
    keys leave it out)."""
    payload = {"scorer": SCORER_VERSION, "model": model, "data": data, "tokenization": tokenization,
               "precision": precision}
    if precision != "fp32":
        payload["layout"] = layout
    if groups:  # absent for pair passes, so existing keys stay valid
        payload["groups"] = True
    if order is not None:
        payload["order"] = order
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class CacheEntry:
    key: str | None  # None: not cacheable (the model's digest is unknown)
    path: str
    status: str = "miss"  # "hit" | "miss" | "uncached"
    seconds: float = 0.0
    pairs_per_s: float | None = None
    num_rows: int | None = None
    scored_with: list[str] = field(default_factory=list)  # the other outputs of the pass that scored it

    def to_dict(self) -> dict:
        return asdict(self)


def entry_path(cache_dir: str, key: str) -> str:
    return posixpath.join(cache_dir.rstrip("/"), "scores", key)


def read_marker(path: str) -> dict | None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    marker = posixpath.join(root, MARKER)
    if not fs.exists(marker):
        return None
    try:
        with fs.open(marker, "r") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def write_marker(path: str, meta: dict) -> None:
    """Mark an entry complete: written to a temporary name, then renamed (atomic on local disks)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    tmp = posixpath.join(root, f".{MARKER}.{os.getpid()}.{time.time_ns()}")
    with fs.open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    fs.mv(tmp, posixpath.join(root, MARKER))


def clear(path: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        fs.rm(root, recursive=True)
