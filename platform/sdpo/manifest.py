"""The run manifest: which stages are complete, and what each was computed from. No Ray, no torch.

`sdpo run` writes `<output>/manifest.json` (atomically) after ingest and after every stage. A stage
counts as complete only once its model is fully written, its files checked against the checkpoint it
came from, and its digest recorded here. Each entry keeps the stage's *inputs*:

- `base`: the base model's digest; `reference` and `init`: the digests of the models the stage was
  referenced against and started from (so a retrained stage t-1 invalidates stage t);
- `partition`: the content digest of the stage's pairs (token ids: data, template and truncation);
- `settings`: everything else that changes what the stage computes (loss, beta, lr, epochs, batch
  geometry, precision, seeds), as a flat mapping so a mismatch can be named key by key.

`sdpo run --resume DIR` recomputes the inputs, skips every leading stage whose recorded inputs match
and whose model still has its recorded digest, and refuses — naming what changed — when a completed
stage no longer matches the job (`--force` retrains from the first such stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MANIFEST = "manifest.json"
VERSION = 1


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def stage_settings(job_dump: dict, stage: dict) -> dict[str, Any]:
    """What, besides its models and pairs, determines a stage's result. `job_dump`: the job config as
    JSON; `stage`: the stage's plan (`StagePlan.to_dict()`). Bookkeeping that cannot change the weights
    (logging, checkpoint interval, inference-pass resources, output paths) is left out, so changing it
    never blocks a resume."""
    t, d, r = job_dump["training"], job_dump["data"], job_dump["reference"]
    keep_training = {k: v for k, v in t.items() if k not in ("logging_steps", "learning_rate", "epochs")}
    return flatten({
        "stage": {k: stage[k] for k in ("index", "partition", "num_pairs", "loss", "beta", "loss_options",
                                         "learning_rate", "epochs", "total_steps")},
        "training": keep_training,
        "data": {"max_length": d["max_length"], "max_prompt_length": d["max_prompt_length"]},
        "reference": {"mode": r["mode"], "precision": r["precision"]},
        "model": {"tokenizer": job_dump["model"].get("tokenizer"), "revision": job_dump["model"].get("revision")},
        "scaling": {"num_workers": job_dump["scaling"]["num_workers"], "use_gpu": job_dump["scaling"]["use_gpu"]},
        "seed": job_dump["seed"],
        "init": job_dump["init"],
    })


def model_identity(digest: str | None, path: str, revision: str | None) -> str:
    """What identifies a model among a stage's inputs: its digest, or, for a hub id whose commit cannot
    be looked up (offline), its id and revision: never None, so two unknown models never look equal."""
    return digest or f"unpinned:{path}@{revision or 'main'}"


def stage_inputs(*, base: str | None, reference: str | None, init: str | None, partition: str,
                 settings: dict[str, Any]) -> dict[str, Any]:
    return {"base": base, "reference": reference, "init": init, "partition": partition, "settings": settings}


_WHAT = {
    "base": "the base model's weights changed",
    "reference": "its reference model changed (an earlier stage was retrained, or the base model changed)",
    "init": "the model it starts from changed",
    "partition": "its pairs changed (data, chat template, max_length or truncation)",
}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two stages' inputs, [] when they match."""
    out = [_WHAT[k] for k in ("base", "reference", "init", "partition") if old.get(k) != new.get(k)]
    a, b = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return out


@dataclass
class Manifest:
    job: dict
    stages: dict[int, dict] = field(default_factory=dict)  # index -> {inputs, model, model_digest, record}
    eval_digest: str | None = None

    def to_dict(self) -> dict:
        return {"version": VERSION, "job": self.job, "eval_digest": self.eval_digest,
                "stages": {str(i): e for i, e in sorted(self.stages.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("version") != VERSION:
            raise ValueError(f"manifest version {data.get('version')!r}, this sdpo reads version {VERSION}")
        return cls(job=data["job"], stages={int(i): e for i, e in data.get("stages", {}).items()},
                   eval_digest=data.get("eval_digest"))

    def complete(self, index: int, *, inputs: dict, model: str, model_digest: str | None, record: dict) -> None:
        self.stages[index] = {"inputs": inputs, "model": model, "model_digest": model_digest, "record": record}

    def drop_from(self, index: int) -> list[int]:
        """Forget stage `index` and every later one (they are retrained); returns the dropped indices."""
        dropped = sorted(i for i in self.stages if i >= index)
        for i in dropped:
            del self.stages[i]
        return dropped
