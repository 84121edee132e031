"""The shared-prompt pair layout: one row per pair, the prompt computed once. Torch only.

The plain layout (`logprobs.collate_pairs`) runs prompt+chosen and prompt+rejected as two rows, so
every prompt token goes through the model twice and every position of both rows gets a
vocabulary-sized logit. Here a pair is one row

    [prompt (P) | chosen (C) | rejected (R)]   positions 0..P-1 | P..P+C-1 | P..P+R-1

with an attention mask in which chosen attends to the prompt and causally to itself, rejected to the
prompt and causally to itself (never to chosen), so each token sees exactly the context it has in the
plain layout, at the same position. The model is asked for logits only where a completion token is
predicted (`logits_to_keep`, a [B, L] boolean mask): P-1..P+C-2 for chosen, P+C..P+C+R-2 for
rejected's tokens after its first. Rejected's first token is predicted from the prompt's last
position, the same logit row as chosen's first, so that row is read twice.

The log-probs are those of the plain layout up to float summation order (tests check loss and gradients
against it). It saves the prompt's compute (~20% of the tokens of UltraFeedback pairs) and the
lm_head and logits of every prompt position (the lm_head is ~20% of a small model's forward FLOPs:
21% of SmolLM2-135M's, 39% of 8 layers of width 512 with Llama 2's 32000-token vocabulary).

Padding: the pairs are sorted by length and the micro-batch is cut into at most `max_splits` row
chunks where that removes padding (`split_points`): each chunk is its own forward/backward, and since
the step back-propagates the weighted *sum* of losses, the accumulated gradient is the same.

Needs a model that takes a 4D mask: the `sdpa` and `eager` attention of transformers' models (flash
attention ignores masks; `supports_shared_prompt` says so and the caller uses the plain layout).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from sdpo.head_logps import model_logps

Tensor = torch.Tensor

# Keys of a shared-prompt batch that are per pair ([B, ...]); everything is sliced by rows.
LENGTH_KEYS = ("prompt_len", "chosen_len", "rejected_len")


def supports_shared_prompt(model: torch.nn.Module) -> bool:
    """True when the model's attention honours a custom 4D mask (transformers' sdpa and eager)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def collate_shared(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    *,
    weights: Sequence[float] | None = None,
    pad_id: int = 0,
    max_splits: int = 4,
    exact_splits: bool = False,
) -> dict[str, Tensor]:
    """B pairs -> one right-padded row each, sorted longest first, with the chunking that trims padding.

    `order` [B] maps each row back to its pair's index in the input; `splits` [k+1] are the chunk
    boundaries (rows splits[i]..splits[i+1]-1). `exact_splits`: always min(max_splits, B) chunks, so
    every rank of a sharded (FSDP) step makes the same number of forward/backward calls — each is a
    collective there.
    """
    rows = [list(p) + list(c) + list(r) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)]
    b = len(rows)
    order = sorted(range(b), key=lambda i: -len(rows[i]))
    length = len(rows[order[0]])
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    lens = torch.zeros((3, b), dtype=torch.long)
    for row, i in enumerate(order):
        p, c, r = len(prompt_ids[i]), len(chosen_ids[i]), len(rejected_ids[i])
        input_ids[row, :p + c + r] = torch.as_tensor(rows[i], dtype=torch.long)
        position_ids[row, :p + c] = torch.arange(p + c)
        position_ids[row, p + c:p + c + r] = torch.arange(p, p + r)
        lens[:, row] = torch.tensor([p, c, r])
    w = torch.ones(b) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "prompt_len": lens[0],
        "chosen_len": lens[1],
        "rejected_len": lens[2],
        "weights": w[order],
        "order": torch.tensor(order, dtype=torch.long),
        "splits": torch.tensor(split_points([len(rows[i]) for i in order], max_splits, exact=exact_splits),
                               dtype=torch.long),
    }


def split_points(lengths_desc: Sequence[int], max_splits: int, min_gain: float = 0.1, *,
                 exact: bool = False) -> list[int]:
    """Chunk boundaries over rows sorted longest first, minimising padded positions.

    Exact dynamic programme over at most `max_splits` chunks (each chunk costs rows x its longest row);
    a further chunk is taken only if it removes at least `min_gain` of the real tokens in padding, since
    every chunk is one more forward/backward call. `exact`: exactly min(max_splits, rows) chunks.
    """
    return best_splits(len(lengths_desc), lambda i, j: (j - i) * lengths_desc[i], max_splits,
                       real=sum(lengths_desc), min_gain=min_gain, exact=exact)


def best_splits(n: int, cost, max_splits: int, *, real: float, min_gain: float = 0.1,
                exact: bool = False) -> list[int]:
    """Boundaries 0 = b_0 < ... < b_k = n of at most `max_splits` chunks of consecutive rows minimising
    sum cost(b_i, b_{i+1}) (`cost(i, j)`: the computed positions of a chunk of rows i..j-1); a further
    chunk only if it saves at least `min_gain` x `real` positions. `exact`: exactly min(max_splits, n)
    chunks (FSDP: every rank makes the same number of calls)."""
    inf = float("inf")
    # best[k][j]: least cost covering rows 0..j-1 with k chunks; cut[k][j]: the last chunk's start
    best = [[inf] * (n + 1) for _ in range(max_splits + 1)]
    cut = [[0] * (n + 1) for _ in range(max_splits + 1)]
    best[0][0] = 0
    for k in range(1, max_splits + 1):
        for j in range(1, n + 1):
            for i in range(j):  # the last chunk is rows i..j-1
                total = best[k - 1][i] + cost(i, j)
                if total < best[k][j]:
                    best[k][j], cut[k][j] = total, i
    chosen_k = 1
    for k in range(2, max_splits + 1):
        if best[chosen_k][n] - best[k][n] >= min_gain * real:
            chosen_k = k
    if exact:
        chosen_k = min(max_splits, n)
    bounds, j = [n], n
    for k in range(chosen_k, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


# The segments each 2D key of a batch spans: a chunk trims the key to the longest of them in its rows.
# `input_ids`/`position_ids`: this layout's [prompt|chosen|rejected] rows; the others: `prefix_cache`'s.
WIDTHS = {"input_ids": LENGTH_KEYS, "position_ids": LENGTH_KEYS, "prompt_ids": ("prompt_len",),
          "chosen_ids": ("chosen_len",), "rejected_ids": ("rejected_len",)}


def chunks(batch: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
    """The batch's row chunks, each 2D key trimmed to the longest of its rows (`WIDTHS`)."""
    splits = batch["splits"].tolist()
    for start, end in zip(splits[:-1], splits[1:], strict=False):
        part = {}
        for k, v in batch.items():
            if k == "splits":
                continue
            v = v[start:end]
            if v.dim() == 2:
                width = int(sum(batch[n][start:end] for n in WIDTHS[k]).max())
                v = v[:, :width]
            part[k] = v
        yield part


def attention_mask(batch: dict[str, Tensor], *, additive_dtype: torch.dtype | None = None) -> Tensor:
    """[B, 1, L, L] mask: causal, rejected never sees chosen, padding sees only itself.

    Boolean (True = attend) for sdpa; with `additive_dtype`, 0 / dtype-min floats for eager attention.
    """
    b, length = batch["input_ids"].shape
    device = batch["input_ids"].device
    pos = torch.arange(length, device=device)
    p, c, r = (batch[k][:, None] for k in LENGTH_KEYS)
    # segment of each position: 0 prompt, 1 chosen, 2 rejected, 3 padding
    seg = (pos >= p).long() + (pos >= p + c).long() + (pos >= p + c + r).long()  # [B, L]
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    causal = pos[None, :, None] >= pos[None, None, :]
    allowed = causal & (q_seg < 3) & (k_seg < 3) & ((k_seg == 0) | (k_seg == q_seg))
    # a padding query attends to itself only: a fully masked row would give NaN, and NaN x 0 gradients
    allowed = allowed | ((q_seg == 3) & torch.eye(length, dtype=torch.bool, device=device))
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def logit_targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(keep [B, L], kept row of each completion token [N], its label [N], its sequence [N]).

    Sequences are numbered as in the plain layout: pair b's chosen is b, its rejected is B + b.
    """
    ids = batch["input_ids"]
    b, length = ids.shape
    device = ids.device
    pos = torch.arange(length, device=device)[None, :]
    p, c, r = (batch[k][:, None] for k in LENGTH_KEYS)
    predicts_chosen = (pos >= p - 1) & (pos < p + c - 1)  # logit at t predicts token t+1
    predicts_rejected_rest = (pos >= p + c) & (pos < p + c + r - 1)
    keep = predicts_chosen | predicts_rejected_rest
    kept_index = keep.flatten().cumsum(0).view(b, length) - 1  # position -> row of the kept logits
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # the token each position predicts
    rows_c, cols_c = predicts_chosen.nonzero(as_tuple=True)
    rows_r, cols_r = predicts_rejected_rest.nonzero(as_tuple=True)
    first_rej = torch.arange(b, device=device)
    first_col = (p - 1).squeeze(1)
    kept = torch.cat([kept_index[rows_c, cols_c], kept_index[first_rej, first_col], kept_index[rows_r, cols_r]])
    labels = torch.cat([next_ids[rows_c, cols_c], ids[first_rej, (p + c).squeeze(1)], next_ids[rows_r, cols_r]])
    seq = torch.cat([rows_c, first_rej + b, rows_r + b])
    return keep, kept, labels, seq


def shared_sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool = False) -> Tensor:
    """log pi(y|x) for the chunk's 2B sequences (chosen 0..B-1, rejected B..2B-1), as `sequence_logps`."""
    config = getattr(getattr(model, "module", model), "config", None)
    additive = None  # eager attention adds the mask to its scores: it needs 0 / dtype-min floats
    if getattr(config, "_attn_implementation", None) == "eager":
        additive = next(model.parameters()).dtype
        if torch.is_autocast_enabled(batch["input_ids"].device.type):
            additive = torch.get_autocast_dtype(batch["input_ids"].device.type)
    keep, kept, labels, seq = logit_targets(batch)
    token_logps = model_logps(model, keep, kept, labels, input_ids=batch["input_ids"], use_cache=False,
                              attention_mask=attention_mask(batch, additive_dtype=additive),
                              position_ids=batch["position_ids"])
    b = batch["input_ids"].shape[0]
    # float64 accumulation, as logprobs.token_logps_sum
    sums = torch.zeros(2 * b, dtype=torch.float64, device=token_logps.device).index_add(0, seq, token_logps.double())
    sums = sums.to(token_logps.dtype)
    if not average:
        return sums
    counts = torch.cat([batch["chosen_len"], batch["rejected_len"]]).clamp(min=1)
    return sums / counts


def completion_tokens(batch: dict[str, Tensor]) -> Tensor:
    """Non-padding tokens per pair as the plain layout counts them: prompt twice plus both completions."""
    return 2 * batch["prompt_len"] + batch["chosen_len"] + batch["rejected_len"]
