"""Preference losses as pure functions on sequence log-probs. Torch only.

Every loss returns the *unreduced* per-pair loss, so callers choose the reduction (the training step
weights pairs so that padding rows count zero). Losses are looked up by name in `LOSSES`; names follow
TRL's `loss_type` where one exists. Each entry says what it needs (a reference model, explicit rewards)
so the pipeline can plan around it.

Notation (see README): h(y) = log pi(y|x) - log pi_ref(y|x), rho = h(y_w) - h(y_l).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., Tensor]
    options: tuple[str, ...] = ()
    needs_reference: bool = True
    mean_logps: bool = False  # uses per-token average log-probs instead of sums (IPO)


def _sigmoid(rho: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO: -log sigma(beta*rho); with label_smoothing eps it is cDPO's expectation over flipped labels."""
    z = beta * rho
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec("sigmoid", _sigmoid, options=("label_smoothing",)),
}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name]


def preference_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    **options: float,
) -> Tensor:
    """Per-pair loss for `loss_type` (see `LOSSES`); shape [B]."""
    spec = get_loss(loss_type)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"loss {loss_type!r} takes options {list(spec.options)}, not {unknown}")
    rho = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return spec.fn(rho, beta=beta, **options)


def preference_metrics(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> dict[str, Tensor]:
    """Per-pair, detached metrics with TRL's names (callers average them)."""
    with torch.no_grad():
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps).float()
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps).float()
        margins = chosen_rewards - rejected_rewards
        return {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(),
            "logps/chosen": chosen_logps.detach().float(),
            "logps/rejected": rejected_logps.detach().float(),
        }
