"""One stage's training mechanics, torch only: optimiser, schedule, the pair step, evaluation.

Nothing here imports Ray, so the step can be unit-tested in milliseconds and measured on a GPU
machine that has torch but not Ray. `worker.py` wires it to Ray Train.

Exact averaging across workers and uneven batches: every pair carries a weight (1 for real pairs, 0
for the rows that pad a partition to a multiple of the worker count). Each micro-step back-propagates
the weighted *sum* of losses; before the optimiser step the gradients are rescaled by
world_size / (real pairs in the window, summed over workers). DDP averages gradients over workers, so
the update is exactly the mean over the real pairs of the window, whatever the padding or the last
partial batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from sdpo.logprobs import sequence_logps, split_pairs, to_groups
from sdpo.losses import get_loss, listwise_loss, preference_loss, preference_metrics
from sdpo.pair_layout import shared_sequence_logps
from sdpo.prefix_cache import PREFIX_KEY, prefix_sequence_logps

Tensor = torch.Tensor

TRAIN_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------
def lr_multiplier(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then linear decay to 0, cosine decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr_scheduler {kind!r}")

    return f


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas, eps: float):
    """AdamW; weight decay on the matrices only (not on biases and norm gains, whose decay pulls them to 0),
    as Hugging Face's Trainer groups them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("bias")]
    rest = [p for n, p in named if not (p.dim() >= 2 and not n.endswith("bias"))]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def cpu_bf16_kernels() -> bool | None:
    """Whether this CPU has bf16 matmul kernels (oneDNN's check); None when torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def slow_bf16(device: torch.device, key: str, fix: str | None = None) -> str | None:
    """A warning when bf16 computes on a CPU without bf16 matmul kernels (they need AVX512-BF16 or AMX):
    there oneDNN falls back to a path one to two orders of magnitude slower than fp32 (measured on an AVX2
    EPYC: 1.2 GFLOP/s against 78 for a 512-square matmul). None elsewhere, or when torch cannot tell."""
    if device.type != "cpu" or cpu_bf16_kernels() is not False:
        return None
    return (f"warning: {key}: bf16 on a CPU without bf16 matmul kernels (this CPU's vector extensions: "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 needs AVX512-BF16 or AMX): its matmuls run one to "
            f"two orders of magnitude slower than fp32; {fix or f'set {key}: fp32 (what auto picks on CPU)'}")


def autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter's bytes: equal iff the weights are identical."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of `model` to 0: its dropout modules, and the float rates modules keep for
    functional dropout (Llama's `attention_dropout`, BART's `dropout`). Returns how many were nonzero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                changed += value > 0
                setattr(module, name, 0.0)
    return int(changed)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# The pair step
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSettings:
    loss_type: str
    beta: float
    options: dict

    @property
    def average_logps(self) -> bool:
        return get_loss(self.loss_type).mean_logps

    @property
    def listwise(self) -> bool:
        return get_loss(self.loss_type).listwise

    @property
    def needs_reference(self) -> bool:
        return get_loss(self.loss_type).needs_reference


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")
GROUP_REFERENCE_COLUMNS = ("ref_group_logps", "group_tokens")


def precomputed_reference(batch: dict[str, Tensor], *, average: bool) -> tuple[Tensor, Tensor]:
    """The reference pass's values that travel with the batch: summed log-probs (or their per-token mean)."""
    chosen, rejected = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
    if average:
        chosen = chosen / batch["chosen_tokens"].clamp(min=1)
        rejected = rejected / batch["rejected_tokens"].clamp(min=1)
    return chosen, rejected


def pair_logps(model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) log-probs of a batch in any layout: plain (`logprobs.collate_pairs`), shared-prompt
    (`pair_layout.collate_shared`, recognised by its `prompt_len` column) or prefix-cache
    (`prefix_cache.collate_prefix`, recognised by its `prompt_ids`; it has `prompt_len` too)."""
    layout = (prefix_sequence_logps if PREFIX_KEY in batch
              else shared_sequence_logps if "prompt_len" in batch else sequence_logps)
    return split_pairs(layout(model, batch, average=average))


def pair_losses(
    policy: torch.nn.Module, reference: torch.nn.Module | None, batch: dict[str, Tensor], loss: LossSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses (with grad) and per-pair detached metrics for one batch.

    `reference=None` (reference.mode: precompute) takes the reference log-probs from the batch's
    `ref_*` columns; otherwise the reference model runs here, under no_grad (mode: online).
    """
    if loss.listwise:
        return group_losses(policy, reference, batch, loss)
    avg = loss.average_logps
    chosen, rejected = pair_logps(policy, batch, average=avg)
    if not loss.needs_reference:  # reference-free (simpo): rewards/* are then beta * log pi
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    elif reference is None:
        ref_chosen, ref_rejected = precomputed_reference(batch, average=avg)
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logps(reference, batch, average=avg)
    losses = preference_loss(
        loss.loss_type, chosen, rejected, ref_chosen, ref_rejected, beta=loss.beta, **loss.options
    )
    metrics = preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta=loss.beta)
    metrics["loss"] = losses.detach().float()
    return losses, metrics


def group_losses(
    policy: torch.nn.Module, reference: torch.nn.Module | None, batch: dict[str, Tensor], loss: LossSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """Listwise losses (infonca, nca) per prompt over its K responses (`logprobs.collate_groups` batches).

    The training metrics are the pairwise ones on each row's binarised pair: its highest- and
    lowest-reward responses (`chosen_index`, `rejected_index`).
    """
    avg = loss.average_logps
    mask = batch["group_mask"]
    logps = to_groups(sequence_logps(policy, batch, average=avg), batch)
    if reference is None:
        ref = batch["ref_group_logps"].float()
        if avg:
            ref = ref / batch["group_tokens"].clamp(min=1)
    else:
        with torch.no_grad():
            ref = to_groups(sequence_logps(reference, batch, average=avg), batch)
    ref = ref.masked_fill(~mask, 0.0)
    rewards = batch["rewards"].float().masked_fill(~mask, 0.0)
    losses = listwise_loss(loss.loss_type, logps, ref, rewards, beta=loss.beta, mask=mask, **loss.options)

    def pick(values: Tensor, name: str) -> Tensor:
        return values.gather(1, batch[name].long()[:, None]).squeeze(1)

    metrics = preference_metrics(pick(logps, "chosen_index"), pick(logps, "rejected_index"),
                                 pick(ref, "chosen_index"), pick(ref, "rejected_index"), beta=loss.beta)
    metrics["loss"] = losses.detach().float()
    return losses, metrics


def weighted_sums(metrics: dict[str, Tensor], weights: Tensor, names: Iterable[str]) -> Tensor:
    """[sum of weights, sum_i w_i * metric_i for each name] as one vector (one all-reduce)."""
    return torch.stack([weights.sum()] + [(metrics[n] * weights).sum() for n in names])


def means_from_sums(sums: Tensor, names: Iterable[str]) -> dict[str, float]:
    total = float(sums[0])
    return {n: (float(v) / total if total else float("nan")) for n, v in zip(names, sums[1:], strict=False)}


def scale_gradients(model: torch.nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


# --------------------------------------------------------------------------------------------------
# Resumable state: what a mid-stage checkpoint holds besides the weights
# --------------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """This process's random state (Python, NumPy, torch CPU and CUDA): restored on resume so dropout
    and anything else random continue exactly where the interrupted run was."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_state(optimizer_state: dict | None, scheduler, *, rng: list[dict], progress: dict, position: dict) -> dict:
    """A mid-stage checkpoint's trainer state. `optimizer_state`: the optimiser's whole state (its
    state_dict), or None where it is saved sharded beside (sharding.save_sharded, under fsdp);
    `progress`: optimiser steps, pairs and tokens so far and the elapsed seconds; `position`: where the data stream stands — the epoch and the
    micro-batches of it every rank has consumed (ranks stay in step, so one position serves all); `rng`:
    one state per rank."""
    return {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng,
            "progress": dict(progress), "position": dict(position)}
