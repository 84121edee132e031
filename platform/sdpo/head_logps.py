"""Token log-probs straight from the last hidden states, the vocabulary's logits in bounded memory. Torch only.

The pair layouts ask the model for logits only where a completion token is predicted (K rows of a
[K, V] matrix instead of [2B, L, V]); on a large vocabulary those K rows are still the biggest tensor of
the step. Llama 3's 128,256 tokens make 8 pairs of 500-token completions a 4 GB fp32 matrix, and the
log-softmax's backward holds about two more of it.

So where the model allows it (`logps_head`), the lm_head itself computes the log-probs. `model_logps` is
what every layout calls (the shared-prompt row, the prefix cache's three calls, the two-row layout, the
listwise groups): while its forward runs under `head_returns_logps`, the model's output projection
receives the kept hidden states [K, d] and returns log p(label) per target [T] instead of logits. Up to
`max_logits_mb` of fp32 logits it does what the layouts did before, one matmul then logsumexp and gather
(the same operations, the same values), in `_FusedLogps`, whose backward forms the softmax's gradient in
place in the kept logits (autograd's allocates four more [K, V] tensors). Above it, `_ChunkedLogps` runs the projection over slices of rows
and keeps only each row's logsumexp; its backward recomputes each slice's logits (one more [K, d] x [d, V]
matmul in all, a third more lm_head work) and forms the gradient slice by slice:

  d log p(y_t) / d logits_r = onehot(y_t) - softmax(logits_r)   for target t on row r

Exact: the same matmuls, in the same dtype (under autocast, the autocast dtype, as `nn.Linear` would run),
with the gradient summed over slices in fp32 (fp64 for a float64 model). Without gradients (reference and
held-out passes) the slices cost nothing extra.

Why inside the head's forward rather than after the model returns: under DDP and FSDP the projection's
weight is only guaranteed whole (and its gradient hooked up) inside the wrapped forward.

A model is eligible (`logps_head`) when its output projection is an `nn.Linear`, its forward takes a
boolean `logits_to_keep`, and that forward returns the projection's output untouched (one `logits =
self.lm_head(hidden_states)` assignment): Gemma 2's soft-capping, Cohere's logit scale or Granite's
scaling would be skipped, so those models keep the full-logits path.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from functools import cache

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# fp32 MiB of one forward's kept logits above which they are computed in slices (training.max_logits_mb)
DEFAULT_MAX_LOGITS_MB = 1024
_BUDGET_ATTR = "_sdpo_max_logits_mb"


def set_max_logits_mb(model: torch.nn.Module, mb: float | None) -> None:
    """The logits budget for this model's forwards; None never slices."""
    setattr(getattr(model, "module", model), _BUDGET_ATTR, mb)


def max_logits_mb(model: torch.nn.Module) -> float | None:
    return getattr(getattr(model, "module", model), _BUDGET_ATTR, DEFAULT_MAX_LOGITS_MB)


def plain_logps(logits: Tensor, rows: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[t]) under logits[rows[t]], in fp32 (fp64 for a float64 model): the non-eligible models'
    path, through autograd."""
    wide = _wide(logits)
    lse = torch.logsumexp(wide, dim=-1) if wide.requires_grad and torch.is_grad_enabled() else row_logsumexp(wide)
    return _wide(logits[rows, labels]) - lse[rows]


# On CPU the elementwise passes over [K, V] logits (the logsumexp's x - max and exp, the backward's softmax)
# run a block of rows at a time, a block this size, so that each block's temporaries stay in cache instead
# of streaming through memory once per operation (measured on a 2-core EPYC, K = 1640, V = 32000: the
# lm_head's forward and backward 2.0 s -> 1.35 s). On a GPU every pass is one kernel over all rows.
_CPU_BLOCK_BYTES = 4 * 2**20


def _block_rows(x: Tensor) -> int:
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, _CPU_BLOCK_BYTES // (x.element_size() * max(1, x.shape[-1])))


def row_logsumexp(x: Tensor) -> Tensor:
    """torch.logsumexp(x, -1) of a 2D tensor, without autograd, a block of rows at a time (`_block_rows`):
    every row is reduced as in one call."""
    if x.dim() != 2:
        return torch.logsumexp(x, dim=-1)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start, end in _slices(x.shape[0], _block_rows(x)):
        torch.logsumexp(x[start:end], dim=-1, out=out[start:end])
    return out


def _wide(t: Tensor) -> Tensor:
    """At least fp32: the log-softmax of bf16 logits in fp32, a float64 model's in float64."""
    return t if t.dtype == torch.float64 else t.float()


# ---------------------------------------------------------------------------------------------------
# which models


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """True when the model's forward takes a boolean [B, L] `logits_to_keep`."""
    # DDP: the wrapper forwards keyword arguments unchanged, so the inner model's forward decides
    return _forward_takes_logits_to_keep(type(getattr(model, "module", model)))


@cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    import transformers.modeling_utils as mu

    # Boolean [B, L] logits_to_keep arrived with `slice_logits_to_keep` (transformers 5); before it the
    # argument was an int or a 1D index only, so the full logits are computed and selected here instead.
    if not hasattr(mu, "slice_logits_to_keep"):
        return False
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@cache
def _returns_head_output(cls: type) -> bool:
    """True when `cls.forward`'s only assignment to `logits` is the lm_head's output on the hidden states."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    # statements `logits = ...` (not the `logits=logits,` keyword of the returned output)
    assignments = [v for v in re.findall(r"^\s*logits\s*=\s*(.+?)\s*$", source, flags=re.MULTILINE)
                   if not v.endswith(",")]
    return len(assignments) == 1 and re.fullmatch(r"self\.lm_head\(hidden_states(\[[^\]]*\])?\)",
                                                  assignments[0].strip()) is not None


def logps_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output projection when `head_returns_logps` may replace it, else None."""
    inner = getattr(model, "module", model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if (not isinstance(head, torch.nn.Linear) or head is not getattr(inner, "lm_head", None)
            or not takes_logits_to_keep(model) or not _returns_head_output(type(inner))):
        return None
    return head


def model_logps(model: torch.nn.Module, keep: Tensor, rows: Tensor, labels: Tensor, **inputs) -> Tensor:
    """log p(labels[t]) under the logit at the rows[t]-th True position of `keep` [B, L] (row-major), from
    one forward `model(**inputs)`: the lm_head computes them where it can (`logps_head`), else the logits
    come back and are picked here."""
    head = logps_head(model)
    if head is not None:
        with head_returns_logps(head, rows, labels, max_logits_mb(model)):
            return model(**inputs, logits_to_keep=keep).logits
    extra = {"logits_to_keep": keep} if takes_logits_to_keep(model) else {}
    logits = model(**inputs, **extra).logits
    return plain_logps(logits[keep] if logits.dim() == 3 else logits, rows, labels)


@contextlib.contextmanager
def head_returns_logps(head: torch.nn.Linear, rows: Tensor, labels: Tensor,
                       max_mb: float | None) -> Iterator[None]:
    """During the block, `head(hidden [K, d])` returns log p(labels[t] | row rows[t]) [T] in fp32."""
    def forward(hidden: Tensor) -> Tensor:
        return kept_logps(hidden, head.weight, head.bias, rows, labels, max_mb=max_mb)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again


# ---------------------------------------------------------------------------------------------------
# the computation


def kept_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, labels: Tensor, *,
               max_mb: float | None = DEFAULT_MAX_LOGITS_MB) -> Tensor:
    """log p(labels[t]) under the logits of hidden[rows[t]] (= hidden @ weight.T + bias) [T], in fp32
    (fp64 for a float64 model)."""
    k, vocab = hidden.shape[0], weight.shape[0]
    slice_rows = k if max_mb is None else max(1, int(max_mb * 2**20) // (4 * vocab))
    dtype = _compute_dtype(hidden, weight)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if k <= slice_rows:
        if not needs_grad:
            return plain_logps(F.linear(hidden, weight, bias), rows, labels)
        return _FusedLogps.apply(hidden, weight, bias, rows, labels, dtype)
    if not needs_grad:
        lse, picked = _sliced_forward(hidden, weight, bias, rows, labels, slice_rows, dtype)
        return picked - lse[rows]
    return _ChunkedLogps.apply(hidden, weight, bias, rows, labels, slice_rows, dtype)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would compute in here: the autocast dtype where autocast is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _slices(k: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, k, size):
        yield start, min(start + size, k)


def _sliced_forward(hidden, weight, bias, rows, labels, slice_rows, dtype) -> tuple[Tensor, Tensor]:
    """Each row's logsumexp [K] and each target's logit [T], one slice of rows at a time (at least fp32)."""
    k = hidden.shape[0]
    wide = torch.promote_types(dtype, torch.float32)
    lse = torch.empty(k, dtype=wide, device=hidden.device)
    picked = torch.empty(rows.shape[0], dtype=wide, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        for start, end in _slices(k, slice_rows):
            logits = F.linear(hidden[start:end].to(dtype), w, b)
            lse[start:end] = row_logsumexp(_wide(logits))
            here = ((rows >= start) & (rows < end)).nonzero(as_tuple=True)[0]
            picked[here] = _wide(logits[rows[here] - start, labels[here]])
    return lse, picked


class _ChunkedLogps(torch.autograd.Function):
    """`kept_logps` above the budget: sliced forward, logits recomputed slice by slice in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, labels, slice_rows, dtype):
        lse, picked = _sliced_forward(hidden, weight, bias, rows, labels, slice_rows, dtype)
        ctx.save_for_backward(hidden, weight, bias, rows, labels, lse)
        ctx.slice_rows, ctx.dtype = slice_rows, dtype
        return picked - lse[rows]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, rows, labels, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtype, k = ctx.dtype, hidden.shape[0]
        wide = lse.dtype
        grad = grad.to(wide)
        row_grad = _row_grad(grad, rows, k)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=wide, device=bias.device) if want_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start, end in _slices(k, ctx.slice_rows):
                h = hidden[start:end].to(dtype)
                here = ((rows >= start) & (rows < end)).nonzero(as_tuple=True)[0]
                gh, gw, gb = _slice_grads(_wide(F.linear(h, w, b)), h, w, lse[start:end], row_grad[start:end],
                                          (rows[here] - start, labels[here]), grad[here], dtype,
                                          ctx.needs_input_grad[:3])
                if want_h:
                    grad_h[start:end] = gh.to(hidden.dtype)
                if want_w:
                    grad_w += gw.to(wide)
                if want_b:
                    grad_b += gb
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _row_grad(grad: Tensor, rows: Tensor, k: int) -> Tensor:
    """Each row's summed upstream gradient [K]: every target on a row pulls its softmax down by its own."""
    return torch.zeros(k, dtype=grad.dtype, device=grad.device).index_add_(0, rows, grad)


def _slice_grads(logits: Tensor, h: Tensor, w: Tensor, lse: Tensor, row_grad: Tensor, targets: tuple[Tensor, Tensor],
                 grad: Tensor, dtype: torch.dtype, wants: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients (hidden, weight, bias) from one slice of rows, its wide `logits` consumed in place:
    onehot(label) - softmax per target, projected back through the matmul in `dtype` (autocast off).
    `targets`: each target's (row within the slice, label); `grad`: their upstream gradients."""
    want_h, want_w, want_b = wants
    g = _softmax_grad_(logits, lse, row_grad)
    g.index_put_(targets, grad, accumulate=True)
    gb = g.sum(0) if want_b else None
    g = g.to(dtype)
    return (g @ w if want_h else None), (g.t() @ h if want_w else None), gb


def _softmax_grad_(logits: Tensor, lse: Tensor, row_grad: Tensor) -> Tensor:
    """-row_grad[r] * softmax(logits)[r] = -row_grad[r] * exp(logits[r] - lse[r]), in place in `logits`
    (the logsumexp's backward), a block of rows at a time on CPU."""
    for start, end in _slices(logits.shape[0], _block_rows(logits)):
        logits[start:end].sub_(lse[start:end, None]).exp_().mul_(-row_grad[start:end, None])
    return logits


class _FusedLogps(torch.autograd.Function):
    """`kept_logps` within the budget: one matmul, and the backward's softmax formed in place in the
    logits the forward kept. Autograd's path (`plain_logps` on `F.linear`) keeps the same logits and then
    allocates four more [K, V] tensors in its backward (x - lse, its exp, the product, the gather's
    zeros) and adds two of them; here they are one in-place pass, the gather's gradient added into it.
    The same operations on the same values otherwise: equal results (the tests compare them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, labels, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            logits = _wide(F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)))
        lse = row_logsumexp(logits)
        ctx.save_for_backward(hidden, weight, bias, rows, labels, lse)
        ctx.dtype, ctx.logits = dtype, logits
        return logits[rows, labels] - lse[rows]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, rows, labels, lse = ctx.saved_tensors
        if ctx.logits is None:
            raise RuntimeError("the lm_head's log-probs were differentiated twice (retain_graph): their backward "
                               "consumes the logits it kept; set training.max_logits_mb to a budget below these "
                               "logits' size to recompute them instead")
        logits, ctx.logits = ctx.logits, None
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        grad = grad.to(lse.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            gh, gw, gb = _slice_grads(logits, hidden.to(dtype), weight.to(dtype), lse,
                                      _row_grad(grad, rows, hidden.shape[0]), (rows, labels), grad, dtype,
                                      ctx.needs_input_grad[:3])
        return (gh.to(hidden.dtype) if want_h else None, gw.to(weight.dtype) if want_w else None,
                gb.to(bias.dtype) if want_b else None, None, None, None)
