"""The preference-optimisation loss family as pure functions on sequence log-probs. Torch only.

Every loss returns the *unreduced* loss, one value per pair (or per prompt for listwise losses), so the
caller chooses the reduction (the training step weights pairs so that padding rows count zero).
Losses are looked up by name in `LOSSES`; names follow TRL's `loss_type` where one exists. Each entry
says what it needs — a reference model, explicit rewards, per-token average log-probs, K responses —
so the pipeline plans around it (no reference pass for a reference-free loss, a reward check before
training for a reward-aware one).

Notation: h(y) = log pi(y|x) - log pi_ref(y|x); rho = h(y_w) - h(y_l); z = beta * rho.

Pairwise (`preference_loss`):
- GPO's convex family f(z) (arXiv 2402.05749): sigmoid log(1 + e^-z) (DPO; cDPO with label_smoothing),
  hinge max(0, 1 - z) (SLiC), ipo (rho_avg - 1/(2 beta))^2 on per-token average log-probs (TRL's IPO:
  beta plays IPO's tau), exponential e^-z, truncated_quadratic max(0, 1 - z)^2, savage 1/(1 + e^z)^2;
- robust: [-(1-eps) log s(z) + eps log s(-z)] / (1 - 2 eps), unbiased under label-flip rate eps;
- dpop: -log s(beta * (rho - lambda * max(0, log pi_ref(y_w) - log pi(y_w)))) (arXiv 2402.13228);
- nca_pair: -log s(c) - 1/2 log s(-c) - 1/2 log s(-r), c = beta h(y_w), r = beta h(y_l) (arXiv 2402.05369);
- simpo: -log s(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma), reference-free (arXiv 2405.14734).

Listwise with explicit rewards (`listwise_loss`, [B, K] tensors; arXiv 2402.05369): model rewards
r_theta = beta * h(y_i), targets p = softmax(rewards / alpha);
- infonca: -sum_i p_i log softmax(r_theta)_i (K = 2 with hard labels is exactly DPO);
- nca: -sum_i [p_i log s(r_theta_i) + (1/K) log s(-r_theta_i)].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Option:
    default: float
    low: float
    high: float
    low_inclusive: bool = True
    high_inclusive: bool = True
    help: str = ""

    def check(self, loss: str, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"loss {loss!r}: option {name!r} must be a finite number, got {value!r}")
        lo_ok = value >= self.low if self.low_inclusive else value > self.low
        hi_ok = value <= self.high if self.high_inclusive else value < self.high
        if not (lo_ok and hi_ok):
            lo, hi = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
            raise ValueError(f"loss {loss!r}: option {name!r} must be in {lo}{self.low}, {self.high}{hi}, "
                             f"got {value!r}")
        return float(value)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., Tensor]
    formula: str
    options: dict[str, Option] = field(default_factory=dict)
    needs_reference: bool = True
    mean_logps: bool = False  # per-token average log-probs instead of sums (IPO, SimPO)
    listwise: bool = False  # [B, K] log-probs and rewards: `listwise_loss`
    needs_rewards: bool = False  # explicit scalar rewards per response

    @property
    def f0(self) -> float | None:
        """The loss at rho = 0 for beta = 1 (policy = reference), pairwise losses only."""
        if self.listwise:
            return None
        zero = torch.zeros(1, dtype=torch.float64)
        return float(preference_loss(self.name, zero, zero, zero, zero, beta=1.0))


# --------------------------------------------------------------------------------------------------
# Pairwise losses: fn(chosen, rejected, ref_chosen, ref_rejected, *, beta, **options) -> [B]
# --------------------------------------------------------------------------------------------------
def _rho(c: Tensor, r: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    return (c - rc) - (r - rr)


def _sigmoid(c, r, rc, rr, *, beta, label_smoothing=0.0):
    z = beta * _rho(c, r, rc, rr)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _hinge(c, r, rc, rr, *, beta):
    return torch.relu(1 - beta * _rho(c, r, rc, rr))


def _ipo(c, r, rc, rr, *, beta):
    return (_rho(c, r, rc, rr) - 1 / (2 * beta)) ** 2


_EXP_LINEAR_BELOW = -50.0  # e^-z continued by its tangent below z0: finite in fp32/bf16 for any margin


def _exponential(c, r, rc, rr, *, beta):
    z = beta * _rho(c, r, rc, rr)
    z0 = _EXP_LINEAR_BELOW
    # exact for z >= z0; below, the tangent at z0 (same value and slope there), so a badly ranked pair
    # early in training gives a huge but finite loss and gradient instead of inf
    return torch.where(z >= z0, torch.exp(-z.clamp(min=z0)), math.exp(-z0) * (1 - (z - z0)))


def _truncated_quadratic(c, r, rc, rr, *, beta):
    return torch.relu(1 - beta * _rho(c, r, rc, rr)) ** 2


def _savage(c, r, rc, rr, *, beta):
    # 1 / (1 + e^z)^2 = sigma(-z)^2, computed in log space so it never overflows
    return torch.exp(2 * F.logsigmoid(-beta * _rho(c, r, rc, rr)))


def _robust(c, r, rc, rr, *, beta, label_smoothing=0.1):
    z = beta * _rho(c, r, rc, rr)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _dpop(c, r, rc, rr, *, beta, dpop_lambda=50.0):
    penalty = torch.relu(rc - c)  # how far the chosen likelihood fell below the reference's
    return -F.logsigmoid(beta * (_rho(c, r, rc, rr) - dpop_lambda * penalty))


def _nca_pair(c, r, rc, rr, *, beta):
    chosen, rejected = beta * (c - rc), beta * (r - rr)
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _simpo(c, r, rc, rr, *, beta, simpo_gamma=0.5):
    del rc, rr  # reference-free
    return -F.logsigmoid(beta * (c - r) - simpo_gamma)


# --------------------------------------------------------------------------------------------------
# Listwise losses: fn(logps, ref_logps, rewards, mask, *, beta, alpha) -> [B]
# --------------------------------------------------------------------------------------------------
def _targets(rewards: Tensor, mask: Tensor, alpha: float) -> Tensor:
    dtype = torch.promote_types(rewards.dtype, torch.float32)  # at least fp32, fp64 kept
    scaled = (rewards.detach().to(dtype) / alpha).masked_fill(~mask, float("-inf"))
    return torch.softmax(scaled, dim=-1)


def _infonca(logps, ref_logps, rewards, mask, *, beta, alpha=1.0):
    model = (beta * (logps - ref_logps)).masked_fill(~mask, float("-inf"))
    log_q = torch.log_softmax(model, dim=-1).masked_fill(~mask, 0.0)
    return -(_targets(rewards, mask, alpha).to(log_q.dtype) * log_q).sum(-1)


def _nca(logps, ref_logps, rewards, mask, *, beta, alpha=1.0):
    model = beta * (logps - ref_logps)
    p = _targets(rewards, mask, alpha).to(model.dtype)
    k = mask.sum(-1, keepdim=True).clamp(min=1)
    terms = p * F.logsigmoid(model) + F.logsigmoid(-model) / k
    return -terms.masked_fill(~mask, 0.0).sum(-1)


_SMOOTHING = dict(low=0.0, high=0.5, high_inclusive=False)
_ALPHA = {"alpha": Option(1.0, 0.0, math.inf, low_inclusive=False, help="reward temperature")}

LOSSES: dict[str, LossSpec] = {s.name: s for s in (
    LossSpec("sigmoid", _sigmoid, "-log σ(βρ); label_smoothing ε: -(1-ε) log σ(βρ) - ε log σ(-βρ)",
             {"label_smoothing": Option(0.0, help="cDPO's label-noise rate ε", **_SMOOTHING)}),
    LossSpec("hinge", _hinge, "max(0, 1 - βρ)"),
    LossSpec("ipo", _ipo, "(ρ̄ - 1/(2β))², ρ̄ on per-token average log-probs", mean_logps=True),
    LossSpec("exponential", _exponential, "exp(-βρ)"),
    LossSpec("truncated_quadratic", _truncated_quadratic, "max(0, 1 - βρ)²"),
    LossSpec("savage", _savage, "1 / (1 + exp(βρ))²"),
    LossSpec("robust", _robust, "[-(1-ε) log σ(βρ) + ε log σ(-βρ)] / (1 - 2ε)",
             {"label_smoothing": Option(0.1, help="label-flip rate ε", **_SMOOTHING)}),
    LossSpec("dpop", _dpop, "-log σ(β(ρ - λ·max(0, log π_ref(y_w) - log π(y_w))))",
             {"dpop_lambda": Option(50.0, 0.0, math.inf, help="penalty λ on a falling chosen likelihood")}),
    LossSpec("nca_pair", _nca_pair, "-log σ(c) - ½ log σ(-c) - ½ log σ(-r), c = βh(y_w), r = βh(y_l)"),
    LossSpec("simpo", _simpo, "-log σ(β(ā_w - ā_l) - γ), ā = per-token average log-prob; no reference",
             {"simpo_gamma": Option(0.5, 0.0, math.inf, help="target reward margin γ")},
             needs_reference=False, mean_logps=True),
    LossSpec("infonca", _infonca, "-Σ_i softmax(r/α)_i log softmax(βh(y))_i over K responses",
             dict(_ALPHA), listwise=True, needs_rewards=True),
    LossSpec("nca", _nca, "-Σ_i [softmax(r/α)_i log σ(βh(y_i)) + (1/K) log σ(-βh(y_i))]",
             dict(_ALPHA), listwise=True, needs_rewards=True),
)}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name]


def resolve_options(loss_type: str, options: dict) -> dict[str, float]:
    """The loss's options with defaults filled in; an unknown option or a value out of range is an error."""
    spec = get_loss(loss_type)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = sorted(spec.options) or "none"
        raise ValueError(f"loss {loss_type!r} takes options {allowed}, not {unknown}")
    return {name: opt.check(loss_type, name, options.get(name, opt.default)) for name, opt in spec.options.items()}


def _check_beta(beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


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
    """Per-pair loss of a pairwise `loss_type` (see `LOSSES`); shape [B].

    Pass summed log-probs, or per-token averages for a loss with `mean_logps` (ipo, simpo). A
    reference-free loss ignores the `ref_*` arguments (pass zeros).
    """
    spec = get_loss(loss_type)
    if spec.listwise:
        raise ValueError(f"loss {loss_type!r} is listwise (K responses with rewards): use listwise_loss")
    _check_beta(beta)
    shapes = [tuple(t.shape) for t in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)]
    if len(set(shapes)) != 1:
        raise ValueError(f"chosen, rejected, ref_chosen and ref_rejected log-probs must have one shape; got {shapes}")
    return spec.fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                   **resolve_options(loss_type, options))


def listwise_loss(
    loss_type: str,
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-prompt loss of a listwise `loss_type` (infonca, nca) over K responses; shape [B].

    `logps`, `ref_logps`, `rewards` are [B, K]; `mask` ([B, K] bool) marks real responses when prompts
    have different K (padded slots are ignored). Rewards are targets: no gradient flows into them.
    """
    spec = get_loss(loss_type)
    if not spec.listwise:
        raise ValueError(f"loss {loss_type!r} is pairwise: use preference_loss")
    _check_beta(beta)
    if logps.dim() != 2 or logps.shape != ref_logps.shape or logps.shape != rewards.shape:
        raise ValueError(f"logps, ref_logps and rewards must all be [B, K]; got {tuple(logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(rewards.shape)}")
    if mask is None:
        mask = torch.ones_like(logps, dtype=torch.bool)
    if mask.shape != logps.shape:
        raise ValueError(f"mask must be [B, K] like logps {tuple(logps.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if bool((mask.sum(-1) < 2).any()):
        raise ValueError("every prompt needs at least 2 responses (mask has a row with fewer)")
    return spec.fn(logps, ref_logps, rewards, mask, beta=beta, **resolve_options(loss_type, {"alpha": alpha}))


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
