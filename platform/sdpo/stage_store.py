"""A content-addressed store of trained stages, shared by the trials of a search. No Ray, no torch.

Two trials whose first stages are identical — same base model, same partition content, same stage
settings, same reference and init models — would train the same weights. The store keys a trained
stage by the hash of exactly those inputs (`manifest.stage_inputs`; the reference and init enter as the
digests of their weights, so a key names a whole chain of stages), and keeps its model and its record:

    <root>/<key>/stage/         the stage's folder: model/ (Hugging Face), trainer_log.jsonl, stage_metrics.json
    <root>/<key>/record.json    the stage's summary record (metrics, cache status, digests)
    <root>/<key>/_COMPLETE.json written last: an entry counts only once it is whole

`claim(inputs)` is how a trial asks for a stage: it returns the complete entry if there is one; else it
takes the key's lease (`locks.Lease`: an exclusive create, kept fresh by a thread while the stage trains)
and returns None — the caller trains and `publish`es, which releases it. A trial that finds the lease
taken waits for the entry to appear, so two trials needing the same prefix at once train it once. A lease
whose holder died (no beat for `stale_after` seconds) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from sdpo import storage
from sdpo.locks import STALE_AFTER, Lease

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
    def __init__(self, root: str, *, poll: float = 1.0, stale_after: float = STALE_AFTER):
        self.root = storage.abspath(root)
        self.poll, self.stale_after = poll, stale_after
        self._leases: dict[str, Lease] = {}  # the stages this process is training
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
        lease = Lease(self._lock(key), stale_after=self.stale_after)
        if not lease.acquire():  # a live trial trains it (its lease beats while it does)
            return False
        self._leases[key] = lease
        return True

    def release(self, inputs: dict) -> None:
        lease = self._leases.pop(stage_key(inputs), None)
        if lease is not None:
            lease.release()

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

