"""A content-addressed store of trained stages, shared by the trials of a search. No Ray, no torch.

Two trials whose first stages are identical — same base model, same partition content, same stage
settings, same reference and init models — would train the same weights. The store keys a trained
stage by the hash of exactly those inputs (`manifest.stage_inputs`; the reference and init enter as the
digests of their weights, so a key names a whole chain of stages), and keeps its model and its record:

    <root>/<key>/stage/         the stage's folder: model/ (Hugging Face), trainer_log.jsonl, stage_metrics.json
    <root>/<key>/record.json    the stage's summary record (metrics, cache status, digests)
    <root>/<key>/_COMPLETE.json written last: an entry counts only once it is whole

`claim(inputs)` is how a trial asks for a stage: it returns the complete entry if there is one; else it
takes the key's lock (an exclusive create, atomic on local and shared filesystems) and returns None — the
caller trains and `publish`es, which releases the lock. A trial that finds the lock taken waits for the
entry to appear, so two trials needing the same prefix at once train it once. A lock whose holder died
(no heartbeat for `stale_after` seconds) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from sdpo import storage

MARKER = "_COMPLETE.json"


def stage_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class StoredStage:
    key: str
    stage_dir: str  # the stage's folder in the store (model/, the step log, the stage metrics)
    record: dict

    @property
    def model(self) -> str:
        return storage.join(self.stage_dir, "model")


class StageStore:
    def __init__(self, root: str, *, poll: float = 1.0, stale_after: float = 600.0):
        self.root = storage.abspath(root)
        self.poll, self.stale_after = poll, stale_after
        if storage.is_local(self.root):
            os.makedirs(self.root, exist_ok=True)

    def _dir(self, key: str) -> str:
        return storage.join(self.root, key)

    def _lock(self, key: str) -> str:
        return storage.join(self.root, f"{key}.lock")

    def get(self, inputs: dict) -> StoredStage | None:
        key = stage_key(inputs)
        if not storage.exists(storage.join(self._dir(key), MARKER)):
            return None
        return StoredStage(key, storage.join(self._dir(key), "stage"),
                           storage.read_json(storage.join(self._dir(key), "record.json")))

    def claim(self, inputs: dict, *, timeout: float = 6 * 3600) -> StoredStage | None:
        """The stored stage, or None with the key's lock held (the caller must train and `publish`,
        or `release` on failure). Waits while another trial holds the lock."""
        deadline = time.monotonic() + timeout
        key = stage_key(inputs)
        while True:
            found = self.get(inputs)
            if found is not None:
                return found
            if self._try_lock(key):
                found = self.get(inputs)  # published between our look and our lock
                if found is not None:
                    self.release(inputs)
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for stage {key} in {self.root}, locked by another trial")
            time.sleep(self.poll)

    def _try_lock(self, key: str) -> bool:
        lock = self._lock(key)
        if storage.is_local(lock):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if time.time() - _mtime(lock) < self.stale_after:
                    return False
                os.unlink(lock)  # its holder died: take it over
                return self._try_lock(key)
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return True
        # Object stores have no exclusive create: look, then write. Two trials racing here both train
        # the stage; the results are identical and the second publish replaces the first.
        if storage.exists(lock):
            return False
        storage.write_text_atomic(lock, f"{os.getpid()}\n")
        return True

    def heartbeat(self, inputs: dict) -> None:
        """Keep a long-held lock fresh (call now and then while training)."""
        lock = self._lock(stage_key(inputs))
        if storage.is_local(lock) and os.path.exists(lock):
            os.utime(lock)

    def release(self, inputs: dict) -> None:
        storage.remove(self._lock(stage_key(inputs)))

    def publish(self, inputs: dict, *, stage_dir: str, record: dict) -> StoredStage:
        """Copy a trained stage's folder into the store, write its record, mark it complete, unlock."""
        key = stage_key(inputs)
        entry = self._dir(key)
        storage.remove(entry)
        storage.copy_dir(stage_dir, storage.join(entry, "stage"))
        storage.write_json_atomic(storage.join(entry, "record.json"), record)
        storage.write_json_atomic(storage.join(entry, MARKER), {"key": key, "inputs": inputs,
                                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.release(inputs)
        return StoredStage(key, storage.join(entry, "stage"), record)


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0
