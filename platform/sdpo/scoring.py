"""Inference passes over prepared pairs: sequence log-probs of a frozen model. Torch only.

`PairScorer` is what the reference pass, the base-model (gamma) pass and the held-out evaluation run
as a Ray Data `map_batches` actor — but it imports no Ray, so it can be measured on a machine with
torch alone. Per batch it sorts the pairs by length and scores them in micro-batches (little padding),
under `torch.inference_mode`, with the weights in bf16 where asked (log-softmax in fp32), and appends
the summed completion log-probs and the completion token counts; a per-token mean is sum / count, so
one pass serves both aggregations.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sdpo.logprobs import collate_pairs, collate_sequences, row_groups, sequence_logps_sums
from sdpo.pair_layout import chunks, collate_shared, shared_sequence_logps, supports_shared_prompt
from sdpo.prefix_cache import collate_prefix, prefix_sequence_logps
from sdpo.training import slow_bf16

TOKENS = ("chosen_tokens", "rejected_tokens")


@contextmanager
def model_directory(ref: Any):
    """A local directory for a model reference: a path or hub id, an fsspec URL (s3://..., downloaded
    to a temporary directory), or anything with `as_directory()` (a Ray Train Checkpoint) — duck-typed,
    so this module needs no Ray."""
    if hasattr(ref, "as_directory"):
        with ref.as_directory() as d:
            yield d
    elif isinstance(ref, str) and "://" in ref and not ref.startswith("file://"):
        import tempfile

        from sdpo import storage

        with tempfile.TemporaryDirectory(prefix="sdpo-model-") as d:  # a stage model on object storage
            storage.download_dir(ref, d)
            yield d
    else:
        yield ref


def load_model(ref: Any, *, dtype: torch.dtype, device: torch.device, revision: str | None = None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with model_directory(ref) as path:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=revision if isinstance(ref, str) else None,
            trust_remote_code=trust_remote_code,
        )
    return model.to(device)


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """auto -> bf16 on GPUs, fp32 on CPU (the same rule as training's autocast)."""
    if precision != "auto":
        return precision
    return "bf16" if on_gpu else "fp32"


@torch.inference_mode()
def score_pairs(
    model: torch.nn.Module,
    prompt_ids: list,
    chosen_ids: list,
    rejected_ids: list,
    *,
    device: torch.device,
    micro_batch: int = 32,
    layout: str = "shared",
) -> dict[str, np.ndarray]:
    """Summed completion log-probs of chosen and rejected, and their token counts, per pair.

    Pairs are scored longest-first in micro-batches of similar length, then put back in input order.
    `layout`: "shared", one row per pair, the prompt computed once (`pair_layout`), where the model's
    attention takes the mask; "prefix", the prompt once through the KV cache (`prefix_cache`); "plain",
    two rows per pair. In fp32 the values agree up to float summation order; under bf16 they agree only
    to bf16 rounding, so a pass that stands in for a policy's own log-probs uses the policy's layout.
    """
    if layout not in ("plain", "shared", "prefix"):
        raise ValueError(f"layout must be plain, shared or prefix, got {layout!r}")
    shared_prompt = layout != "plain" and supports_shared_prompt(model)
    collate, logps = ((collate_prefix, prefix_sequence_logps) if layout == "prefix"
                      else (collate_shared, shared_sequence_logps))
    n = len(prompt_ids)
    lengths = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids,
                                                                         strict=True)])
    order = np.argsort(-lengths, kind="stable")
    out = {k: np.zeros(n, np.float64) for k in ("chosen_logps", "rejected_logps")}
    out |= {k: np.zeros(n, np.int32) for k in TOKENS}
    for start in range(0, n, micro_batch):
        idx = order[start:start + micro_batch]
        if shared_prompt:
            batch = collate([prompt_ids[i] for i in idx], [chosen_ids[i] for i in idx],
                            [rejected_ids[i] for i in idx], max_splits=4)
            for part in chunks({k: v.to(device) for k, v in batch.items()}):
                sums = logps(model, part).double().cpu().numpy()
                rows, b = idx[part["order"].cpu().numpy()], len(part["order"])
                out["chosen_logps"][rows], out["rejected_logps"][rows] = sums[:b], sums[b:]
                out["chosen_tokens"][rows] = part["chosen_len"].cpu().numpy()
                out["rejected_tokens"][rows] = part["rejected_len"].cpu().numpy()
            continue
        batch = collate_pairs([prompt_ids[i] for i in idx], [chosen_ids[i] for i in idx],
                              [rejected_ids[i] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        sums, counts = sequence_logps_sums(model, batch)
        b = len(idx)
        sums, counts = sums.double().cpu().numpy(), counts.cpu().numpy()
        out["chosen_logps"][idx], out["rejected_logps"][idx] = sums[:b], sums[b:]
        out["chosen_tokens"][idx], out["rejected_tokens"][idx] = counts[:b], counts[b:]
    return out


@torch.inference_mode()
def score_groups(
    model: torch.nn.Module,
    prompt_ids: list,
    groups: list,
    *,
    device: torch.device,
    micro_batch: int = 32,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Summed log-probs and token counts of every completion of every row's group (K may vary by row).

    All sequences are scored longest-first, 2 * micro_batch per forward (the sequences of
    `micro_batch` pairs), then put back per row.
    """
    flat = [(r, k, len(prompt_ids[r]) + len(c)) for r, g in enumerate(groups) for k, c in enumerate(g)]
    order = sorted(range(len(flat)), key=lambda i: -flat[i][2])
    logps = [np.zeros(len(g), np.float64) for g in groups]
    tokens = [np.zeros(len(g), np.int32) for g in groups]
    step = 2 * micro_batch
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        batch = collate_sequences([prompt_ids[flat[i][0]] for i in idx],
                                  [groups[flat[i][0]][flat[i][1]] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        sums, counts = sequence_logps_sums(model, batch)
        sums, counts = sums.double().cpu().numpy(), counts.cpu().numpy()
        for j, i in enumerate(idx):
            r, k, _ = flat[i]
            logps[r][k], tokens[r][k] = sums[j], counts[j]
    return logps, tokens


GROUP_COLUMNS = ("responses_ids", "rewards", "chosen_index", "rejected_index")


class PairScorer:
    """Ray Data `map_batches` callable (pyarrow batches in and out): appends
    `<prefix>chosen_logps`, `<prefix>rejected_logps` and, if absent, `chosen_tokens`, `rejected_tokens`.

    With `groups` (listwise losses) it scores every completion of each row's group (its K responses,
    or chosen and rejected for a pair) and also appends `<prefix>group_logps` and `group_tokens`
    (lists); chosen/rejected are then read from the group, not scored twice."""

    def __init__(self, model: Any, *, prefix: str = "", precision: str = "fp32", num_gpus: float = 0.0,
                 threads: int | None = None, micro_batch: int = 32, revision: str | None = None,
                 trust_remote_code: bool = False, groups: bool = False, layout: str = "shared"):
        if threads:  # never more threads than the node has cores (logical CPUs may oversubscribe)
            torch.set_num_threads(max(1, min(threads, os.cpu_count() or threads)))
        self.device = pick_device(num_gpus)
        # "autocast": fp32 weights under bf16 autocast, as the policy trains in bf16 (plan.plan_scoring)
        mode = resolve_precision(precision, self.device.type == "cuda")
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        self.model = load_model(model, dtype=dtype, device=self.device, revision=revision,
                                trust_remote_code=trust_remote_code).eval()
        self.autocast = mode == "autocast"
        fix = "set training.precision: fp32 (reference.precision: auto follows it)"
        if mode != "fp32" and (slow := slow_bf16(self.device, "reference.precision", fix)):
            print(slow, file=sys.stderr, flush=True)
        self.prefix, self.micro_batch, self.groups, self.layout = prefix, micro_batch, groups, layout

    def __call__(self, table: pa.Table) -> pa.Table:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self._score(table)

    def _score(self, table: pa.Table) -> pa.Table:
        ids = [table.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        if self.groups:
            return self._score_groups(table, ids)
        scores = score_pairs(self.model, *ids, device=self.device, micro_batch=self.micro_batch, layout=self.layout)
        for name in ("chosen_logps", "rejected_logps"):
            table = table.append_column(self.prefix + name, pa.array(scores[name], pa.float64()))
        for name in TOKENS:
            if name not in table.column_names:
                table = table.append_column(name, pa.array(scores[name], pa.int32()))
        return table

    def _score_groups(self, table: pa.Table, ids: list) -> pa.Table:
        groups = row_groups(ids[1], ids[2], table.column("responses_ids").to_pylist())
        logps, tokens = score_groups(self.model, ids[0], groups, device=self.device, micro_batch=self.micro_batch)
        ci = table.column("chosen_index").to_numpy()
        ri = table.column("rejected_index").to_numpy()
        rows = range(table.num_rows)
        picked = {
            "chosen_logps": [logps[r][ci[r]] for r in rows], "rejected_logps": [logps[r][ri[r]] for r in rows],
            "chosen_tokens": [tokens[r][ci[r]] for r in rows], "rejected_tokens": [tokens[r][ri[r]] for r in rows],
        }
        for name in ("chosen_logps", "rejected_logps"):
            table = table.append_column(self.prefix + name, pa.array(picked[name], pa.float64()))
        for name in TOKENS:
            if name not in table.column_names:
                table = table.append_column(name, pa.array(picked[name], pa.int32()))
        table = table.append_column(self.prefix + "group_logps", pa.array([x.tolist() for x in logps],
                                                                          pa.list_(pa.float64())))
        if "group_tokens" not in table.column_names:
            table = table.append_column("group_tokens", pa.array([x.tolist() for x in tokens], pa.list_(pa.int32())))
        return table
