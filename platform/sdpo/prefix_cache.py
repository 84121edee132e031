"""The prefix-cache pair layout: the prompt computed once through the model's KV cache. Torch only.

`pair_layout` computes a pair's prompt once by putting [prompt | chosen | rejected] in one row under a
4D mask; its attention then costs (P+C+R)^2 per row, more than the plain layout's (P+C)^2 + (P+R)^2.
Here the prompt is run alone and its keys and values are reused by both completions:

  1. the B prompts (right-padded, explicit positions, a 2D mask) go through the model with a
     `DynamicCache`; logits only at each prompt's last position, which predicts both completions'
     first token;
  2. the chosen completions (right-padded), then the rejected ones, go through the model over that
     cache (`cache=`; `past_key_values=` in older transformers): their 2D mask is [the prompt's padding
     mask | the completion's], their positions continue from each prompt's length, and logits are asked
     only where a completion token is predicted. A completion's last token predicts nothing scored, so
     it is not run.

Attention then costs P^2 + C(P+C) + R(P+R) (query, key) pairs per pair instead of (P+C+R)^2 under the
dense mask (-40% on UltraFeedback pairs), for more padding: prompts, chosen and rejected are each padded to
their longest in the chunk (+6% positions computed). Chosen and rejected run as two calls over one cache
rather than one call over the cache repeated for 2B rows: that pads each to its own longest, and measured
faster on a CPU (fp32 +7%, bf16 +3%, 25M Llama; benchmarks/README.md).

transformers builds the mask from the 2D one and the cache's length: query column P_max + i sees every
key column up to it that the 2D mask marks real, so a right-padded prompt's padding columns sit between
the prompt and the completion and are masked (RoPE depends on `position_ids`, not on columns). Right
rather than left padding for the prompts: a left-padded prompt has padding queries with no key to attend
to (fully masked rows, which older torch sdpa kernels turn into NaN); here every query sees at least its
row's first token.

The cache keeps the autograd graph: `DynamicLayer.update` concatenates the prompt's keys/values with the
completion's (`torch.cat`, differentiable), so the completions' loss reaches the prompt's computation
(tests compare every gradient with the plain layout's). The rejected call gets a second `DynamicCache` over
the same prompt tensors, since the chosen call's update replaces the first cache's.

Falls back to `pair_layout.shared_sequence_logps` (the 4D-mask layout, same values) when the model would
drop the cache: transformers' gradient checkpointing turns the cache off in training
(`GradientCheckpointingLayer` sets `cache=None` when the layer is checkpointed and gradients are on), and
any model that returns without filling it. Needs `sdpa` or `eager` attention, as the mask layout does
(`pair_layout.supports_shared_prompt`: the fallback needs a 4D mask).

The batch (`collate_prefix`) keeps `pair_layout`'s per-pair keys (`prompt_len`, `chosen_len`,
`rejected_len`, `weights`, `order`, `splits`), so `pair_layout.chunks`, `completion_tokens` and the
worker's bookkeeping apply unchanged; its `prompt_ids` [B, P], `chosen_ids` [B, C] and `rejected_ids`
[B, R] mark it for `training.pair_logps`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from sdpo.head_logps import model_logps
from sdpo.pair_layout import best_splits, shared_sequence_logps

Tensor = torch.Tensor

# The key that marks a prefix-cache batch (`training.pair_logps` dispatches on it).
PREFIX_KEY = "prompt_ids"


def collate_prefix(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    *,
    weights: Sequence[float] | None = None,
    pad_id: int = 0,
    max_splits: int = 4,
    exact_splits: bool = False,
) -> dict[str, Tensor]:
    """B pairs -> right-padded prompts, chosen and rejected, rows sorted longest first, and the chunking
    that trims padding. `order`, `splits` and `exact_splits` as in `pair_layout.collate_shared`."""
    b = len(prompt_ids)
    if not (len(chosen_ids) == len(rejected_ids) == b):
        raise ValueError(f"{b} prompts, {len(chosen_ids)} chosen, {len(rejected_ids)} rejected")
    lens = [(len(p), len(c), len(r)) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)]
    if any(min(x) < 1 for x in lens):
        raise ValueError("every prompt, chosen and rejected needs at least one token")
    order = sorted(range(b), key=lambda i: -sum(lens[i]))
    out = {}
    for k, (name, seqs) in enumerate((("prompt_ids", prompt_ids), ("chosen_ids", chosen_ids),
                                      ("rejected_ids", rejected_ids))):
        ids = torch.full((b, max(x[k] for x in lens)), pad_id, dtype=torch.long)
        for row, i in enumerate(order):
            ids[row, :lens[i][k]] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
        out[name] = ids
    sorted_lens = torch.tensor([lens[i] for i in order], dtype=torch.long).view(b, 3)
    w = torch.ones(b) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    out |= {
        "prompt_len": sorted_lens[:, 0],
        "chosen_len": sorted_lens[:, 1],
        "rejected_len": sorted_lens[:, 2],
        "weights": w[order],
        "order": torch.tensor(order, dtype=torch.long),
        "splits": torch.tensor(prefix_splits(sorted_lens.tolist(), max_splits, exact=exact_splits),
                               dtype=torch.long),
    }
    return out


def prefix_splits(lens: Sequence[Sequence[int]], max_splits: int, min_gain: float = 0.1, *,
                  exact: bool = False) -> list[int]:
    """Chunk boundaries over the rows' (P, C, R), minimising the positions the chunks compute.

    A chunk of n rows computes n x (P_max + C_max - 1 + R_max - 1) positions (`computed_positions`).
    """
    n = len(lens)
    # cost[i][j]: the chunk of rows i..j-1, with running maxima over j
    cost = [[0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        width = [0, 0, 0]
        for j in range(i + 1, n + 1):
            width = [max(w, x) for w, x in zip(width, lens[j - 1], strict=True)]
            cost[i][j] = (j - i) * (sum(width) - 2)
    real = sum(p + c + r - 2 for p, c, r in lens)
    return best_splits(n, lambda i, j: cost[i][j], max_splits, real=real, min_gain=min_gain, exact=exact)


def computed_positions(batch: dict[str, Tensor]) -> int:
    """Positions a chunk runs through the model: its prompts, and both completions but their last column
    (a completion's last token predicts nothing that is scored)."""
    b = batch["prompt_ids"].shape[0]
    return b * (batch["prompt_ids"].shape[1] + batch["chosen_ids"].shape[1] + batch["rejected_ids"].shape[1] - 2)


def uses_cache(model: torch.nn.Module) -> bool:
    """False where transformers would drop the cache: gradient checkpointing in a training forward."""
    inner = getattr(model, "module", model)
    if not (inner.training and torch.is_grad_enabled()):
        return True
    # what `PreTrainedModel.is_activation_checkpointing` reads (`is_gradient_checkpointing` before 5.x)
    return not any(getattr(m, "gradient_checkpointing", False) for m in inner.modules())


def prefix_sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool = False) -> Tensor:
    """log pi(y|x) for the chunk's 2B sequences (chosen 0..B-1, rejected B..2B-1), as `sequence_logps`."""
    if not uses_cache(model):
        return shared_sequence_logps(model, as_shared(batch), average=average)
    from transformers import DynamicCache

    prompt, chosen, rejected = batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]
    p, c, r = batch["prompt_len"], batch["chosen_len"], batch["rejected_len"]
    b, width_p = prompt.shape
    device = prompt.device
    cols_p = torch.arange(width_p, device=device)
    prompt_mask = cols_p[None, :] < p[:, None]
    last = cols_p[None, :] == (p - 1)[:, None]  # [B, P]: the logit that predicts each first token

    # 1. the prompts, once
    cache = DynamicCache()
    rows = torch.arange(b, device=device).repeat(2)  # each prompt's last logit predicts both first tokens
    first = _kept_logps(model, prompt, prompt_mask, cols_p.expand(b, -1), last, cache,
                        rows, torch.cat([chosen[:, 0], rejected[:, 0]]))
    if cache.get_seq_length() != width_p:  # the model did not keep its keys/values: the mask layout
        return shared_sequence_logps(model, as_shared(batch), average=average)
    prompt_kv = [(k, v) for k, v, *_ in cache]
    token_logps = [first]
    seq = [torch.arange(2 * b, device=device)]

    # 2. the chosen completions (sequences 0..B-1), then the rejected (B..2B-1), each over the prompts' cache
    for ids, lens, offset in ((chosen, c, 0), (rejected, r, b)):
        # the last column predicts nothing scored; but a chunk of 1-token completions still makes its call
        # (with nothing kept): every rank must make the same calls, each one a collective under FSDP and DDP
        width = max(ids.shape[1] - 1, 1)
        if offset:  # the chosen call replaced `cache`'s tensors by [prompt | chosen]: a new one over the prompt
            cache = DynamicCache(ddp_cache_data=prompt_kv)
        cols = torch.arange(width, device=device)
        mask = torch.cat([prompt_mask, cols[None, :] < lens[:, None]], dim=1)
        keep = cols[None, :] < (lens - 1)[:, None]  # column t predicts token t+1
        labels = ids[:, 1:][keep[:, :ids.shape[1] - 1]]  # none where every completion is 1 token
        token_logps.append(_kept_logps(model, ids[:, :width], mask, p[:, None] + cols, keep, cache,
                                       torch.arange(labels.shape[0], device=device), labels))
        seq.append(keep.nonzero(as_tuple=True)[0] + offset)
    # float64 accumulation, as logprobs.token_logps_sum
    values = torch.cat(token_logps)
    sums = torch.zeros(2 * b, dtype=torch.float64, device=device).index_add(0, torch.cat(seq), values.double())
    sums = sums.to(values.dtype)
    if not average:
        return sums
    return sums / torch.cat([c, r]).clamp(min=1)


def _kept_logps(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, keep: Tensor, cache,
                rows: Tensor, labels: Tensor) -> Tensor:
    """`head_logps.model_logps` of a forward that reads and extends `cache`."""
    return model_logps(model, keep, rows, labels, input_ids=input_ids, attention_mask=attention_mask.long(),
                       position_ids=position_ids, use_cache=True, **{_cache_argument(model): cache})


def _cache_argument(model: torch.nn.Module) -> str:
    """`cache` where the forward takes it (transformers 5.24 deprecates `past_key_values`), else `past_key_values`."""
    inner = getattr(model, "module", model)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def as_shared(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same pairs in `pair_layout.collate_shared`'s layout (one [prompt|chosen|rejected] row each), for
    the fallback. Rows stay in their order; the per-pair keys are shared."""
    p, c, r = batch["prompt_len"], batch["chosen_len"], batch["rejected_len"]
    b = p.shape[0]
    device = batch["prompt_ids"].device
    length = int((p + c + r).max())
    input_ids = torch.zeros((b, length), dtype=torch.long, device=device)
    position_ids = torch.zeros((b, length), dtype=torch.long, device=device)
    for row, (pi, ci, ri) in enumerate(zip(p.tolist(), c.tolist(), r.tolist(), strict=True)):
        input_ids[row, :pi + ci + ri] = torch.cat([batch["prompt_ids"][row, :pi], batch["chosen_ids"][row, :ci],
                                                   batch["rejected_ids"][row, :ri]])
        position_ids[row, :pi + ci] = torch.arange(pi + ci, device=device)
        position_ids[row, pi + ci:pi + ci + ri] = torch.arange(pi, pi + ri, device=device)
    return {"input_ids": input_ids, "position_ids": position_ids} | {
        k: v for k, v in batch.items() if v.dim() == 1}
