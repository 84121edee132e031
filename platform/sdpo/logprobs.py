"""Batches of preference pairs and their sequence log-probs. Torch only.

A batch of B pairs is one [2B, L] tensor: rows 0..B-1 are prompt+chosen, rows B..2B-1 are
prompt+rejected, so the policy (and the reference) run one forward pass per batch. A batch of B
prompts with K responses each (listwise losses) is one [N, L] tensor of all N = sum K_b sequences,
with an index into its [B, K] view (`collate_groups`, `to_groups`).

log pi(y|x) is the sum over the completion's tokens (prompt and padding masked out, the appended EOS
counted). Only the completion positions go through the log-softmax, so no [2B, L, V] log-prob tensor
is ever materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdpo.head_logps import model_logps, plain_logps

Tensor = torch.Tensor


def collate_sequences(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Pad N prompt+completion sequences; `completion_mask` marks the tokens whose log-probs count."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    comp_lens = [len(c) for c in completion_ids]
    length = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    completion_mask = torch.zeros((n, length), dtype=torch.bool)
    for i, (seq, comp) in enumerate(zip(seqs, comp_lens, strict=True)):
        start = 0 if padding_side == "right" else length - len(seq)
        end = start + len(seq)
        input_ids[i, start:end] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[i, start:end] = 1
        completion_mask[i, end - comp:end] = True
    # Explicit positions: with left padding the first real token must still be position 0.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
    }


def collate_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    *,
    weights: Sequence[float] | None = None,
    pad_id: int = 0,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Pad B pairs into model inputs: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected."""
    prompts = list(prompt_ids) + list(prompt_ids)
    out = collate_sequences(prompts, list(chosen_ids) + list(rejected_ids), pad_id=pad_id,
                            padding_side=padding_side)
    b = len(prompt_ids)
    out["weights"] = torch.ones(b) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    return out


def row_groups(chosen_ids, rejected_ids, responses_ids) -> list[list]:
    """Each row's group of completions: its K responses, or [chosen, rejected] for a pair."""
    return [list(r) if r is not None and len(r) else [c, j]
            for c, j, r in zip(chosen_ids, rejected_ids, responses_ids, strict=True)]


def collate_groups(
    prompt_ids: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    *,
    weights: Sequence[float] | None = None,
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """Pad B prompts with K_b completions each (listwise losses) into one [N, L] batch, N = sum K_b.

    `group_index` [N] is each sequence's slot b * K + k in the [B, K] view (K = max K_b) and
    `group_mask` [B, K] marks the real slots.
    """
    prompts, completions, slots = [], [], []
    k_max = max(len(g) for g in groups)
    for b, (prompt, group) in enumerate(zip(prompt_ids, groups, strict=True)):
        for k, completion in enumerate(group):
            prompts.append(prompt)
            completions.append(completion)
            slots.append(b * k_max + k)
    out = collate_sequences(prompts, completions, pad_id=pad_id)
    n_rows = len(prompt_ids)
    mask = torch.zeros(n_rows * k_max, dtype=torch.bool)
    index = torch.tensor(slots, dtype=torch.long)
    mask[index] = True
    out["group_index"] = index
    out["group_mask"] = mask.view(n_rows, k_max)
    out["weights"] = torch.ones(n_rows) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    return out


def to_groups(flat: Tensor, batch: dict[str, Tensor], fill: float = 0.0) -> Tensor:
    """Per-sequence values [N] -> the [B, K] view of `collate_groups` (padding slots = `fill`)."""
    mask = batch["group_mask"]
    out = torch.full((mask.numel(),), fill, dtype=flat.dtype, device=flat.device)
    return out.index_put((batch["group_index"],), flat).view(mask.shape)


def token_logps_sum(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of log p(token) over each row's completion tokens, and their count, from every position's logits.

    logits[:, t] predicts input_ids[:, t+1]; only masked positions are normalised.
    """
    targets = completion_mask[:, 1:]
    picked = logits[:, :-1][targets]  # [N, V], N = completion tokens in the batch
    labels = input_ids[:, 1:][targets]
    token_logps = plain_logps(picked, torch.arange(labels.shape[0], device=labels.device), labels)
    return _row_sums(token_logps, targets), targets.sum(-1)


def _row_sums(token_logps: Tensor, targets: Tensor) -> Tensor:
    """The token log-probs (in `targets`' row-major order) summed per row of `targets` [N, L-1].

    Accumulated in float64: a sequential fp32 sum of ~500 token log-probs drifts by ~1e-5 relative."""
    rows = targets.nonzero(as_tuple=True)[0]
    sums = torch.zeros(targets.shape[0], dtype=torch.float64, device=token_logps.device)
    return sums.index_add(0, rows, token_logps.double()).to(token_logps.dtype)


def sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool = False) -> Tensor:
    """log pi(y|x) per row of the batch: the sum over completion tokens, or their mean if `average`."""
    sums, counts = sequence_logps_sums(model, batch)
    return sums / counts.clamp(min=1) if average else sums


def sequence_logps_sums(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Each row's summed completion log-probs and completion token count, from one forward that computes
    logits only at the positions predicting a completion token (`head_logps.model_logps`: by the lm_head,
    in slices above the model's logits budget, where the model allows it)."""
    targets = batch["completion_mask"][:, 1:]
    labels = batch["input_ids"][:, 1:][targets]
    keep = torch.nn.functional.pad(targets, (0, 1))  # column t predicts token t+1: the same order as labels
    token_logps = model_logps(model, keep, torch.arange(labels.shape[0], device=labels.device), labels,
                              input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], use_cache=False)
    return _row_sums(token_logps, targets), targets.sum(-1)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """[2B] -> (chosen [B], rejected [B])."""
    b = values.shape[0] // 2
    return values[:b], values[b:]
