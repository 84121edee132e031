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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from sdpo.logprobs import sequence_logps, split_pairs
from sdpo.losses import get_loss, preference_loss, preference_metrics

Tensor = torch.Tensor

TRAIN_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)
EVAL_METRICS = ("loss", "reward_accuracy", "ranking_accuracy", "margin", "logps_chosen", "logps_rejected")


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
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


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


def pair_losses(
    policy: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, Tensor], loss: LossSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses (with grad) and per-pair detached metrics for one batch."""
    avg = loss.average_logps
    chosen, rejected = split_pairs(sequence_logps(policy, batch, average=avg))
    with torch.no_grad():
        ref_chosen, ref_rejected = split_pairs(sequence_logps(reference, batch, average=avg))
    losses = preference_loss(
        loss.loss_type, chosen, rejected, ref_chosen, ref_rejected, beta=loss.beta, **loss.options
    )
    metrics = preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta=loss.beta)
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
# Evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def eval_sums(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    batches: Iterator[dict[str, Tensor]],
    loss: LossSettings,
    num_sources: int,
    *,
    device: torch.device,
    bf16: bool,
) -> Tensor:
    """Per-source weighted sums of EVAL_METRICS: a [num_sources, 1 + len(EVAL_METRICS)] tensor."""
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(num_sources, 1 + len(EVAL_METRICS), device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(bf16, device):
            losses, m = pair_losses(policy, reference, batch, loss)
        per_pair = {
            "loss": losses.float(),
            "reward_accuracy": m["rewards/accuracies"],
            "ranking_accuracy": (m["logps/chosen"] > m["logps/rejected"]).float(),
            "margin": m["rewards/margins"],
            "logps_chosen": m["logps/chosen"],
            "logps_rejected": m["logps/rejected"],
        }
        w = batch["weights"]
        for s in batch["source_index"].unique().tolist():
            sel = batch["source_index"] == s
            sums[s] += weighted_sums({k: v[sel] for k, v in per_pair.items()}, w[sel], EVAL_METRICS)
    policy.train(was_training)
    return sums


def eval_report(sums: Tensor, source_names: list[str]) -> dict[str, float]:
    """`eval/<metric>` over all sources plus `eval/<source>/<metric>` per source."""
    out = {f"eval/{k}": v for k, v in means_from_sums(sums.sum(0), EVAL_METRICS).items()}
    if len(source_names) > 1:
        for i, name in enumerate(source_names):
            if float(sums[i, 0]) > 0:
                out.update({f"eval/{name}/{k}": v for k, v in means_from_sums(sums[i], EVAL_METRICS).items()})
    out["eval/num_pairs"] = float(sums[:, 0].sum())
    return out
