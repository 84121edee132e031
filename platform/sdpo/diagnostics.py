"""What sDPO is doing, from scored pairs: the gamma diagnostic and the held-out metrics. No Ray.

gamma (the sDPO paper's Figure 2): gamma(x) = log pi(y_w|x) - log pi(y_l|x), summed over completion
tokens, over a stage's training partition. Under the stage's reference M_{t-1} it is DPO's lower
bound; the paper measures it rising from the SFT model S to M_1 (-38.60 -> -25.10 on UltraFeedback),
i.e. each stage's reference is better aligned and sets a higher bar.

Held-out metrics per stage come from three scored columns of the same eval rows — the stage's model
(policy), its reference M_{t-1} and the base model M_0:
- `loss`, `reward_accuracy`, `margin`: implicit rewards beta * (log pi - log pi_base), comparable
  across stages and runs;
- `loss_vs_ref`, `reward_accuracy_vs_ref`, `margin_vs_ref`: against the stage's reference (what the
  stage optimised);
- `ranking_accuracy`: reference-free, the share of pairs with log pi(y_w|x) > log pi(y_l|x);
- `logps_chosen`, `logps_rejected`: summed log-probs (chosen typically falls under DPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sdpo.losses import get_loss, preference_loss

EVAL_METRICS = (
    "loss", "reward_accuracy", "margin", "loss_vs_ref", "reward_accuracy_vs_ref", "margin_vs_ref",
    "ranking_accuracy", "logps_chosen", "logps_rejected",
)


# --------------------------------------------------------------------------------------------------
# gamma
# --------------------------------------------------------------------------------------------------
def gamma_stats(gamma: np.ndarray) -> dict[str, float]:
    g = np.asarray(gamma, dtype=np.float64)
    if g.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan")}
    return {"mean": float(g.mean()), "median": float(np.median(g)), "std": float(g.std())}


def gamma_summary(ref: np.ndarray | None, base: np.ndarray | None, bins: int = 50) -> tuple[dict, dict]:
    """Flat metrics (`gamma_ref/mean`, ...) and histograms on shared edges, so the two overlay."""
    present = {name: np.asarray(g, np.float64) for name, g in (("ref", ref), ("base", base)) if g is not None}
    metrics = {f"gamma_{name}/{k}": v for name, g in present.items() for k, v in gamma_stats(g).items()}
    for name, g in present.items():
        if not np.isfinite(g).all():  # a broken pair shows up in the count, not as a meaningless histogram
            metrics[f"gamma_{name}/non_finite"] = float((~np.isfinite(g)).sum())
    present = {name: g[np.isfinite(g)] for name, g in present.items()}
    values = np.concatenate([g for g in present.values() if g.size] or [np.zeros(0)])
    hists = {}
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for name, g in present.items():
            hists[name] = {"edges": edges.tolist(), "counts": np.histogram(g, edges)[0].tolist()}
    return metrics, hists


# --------------------------------------------------------------------------------------------------
# Held-out metrics
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scored:
    """Summed completion log-probs of one model on a batch of pairs."""

    chosen: np.ndarray
    rejected: np.ndarray


def _implicit(policy: Scored, ref: Scored, tokens: tuple[np.ndarray, np.ndarray], loss_type: str, beta: float,
              options: dict) -> dict[str, np.ndarray]:
    """Loss, reward accuracy and margin against `ref`, in the loss's own aggregation (sum or mean)."""
    if get_loss(loss_type).mean_logps:
        tc, tr = (np.maximum(t, 1) for t in tokens)
        pc, pr, rc, rr = policy.chosen / tc, policy.rejected / tr, ref.chosen / tc, ref.rejected / tr
    else:
        pc, pr, rc, rr = policy.chosen, policy.rejected, ref.chosen, ref.rejected
    t = [torch.tensor(np.asarray(x, np.float64)) for x in (pc, pr, rc, rr)]  # a copy: Arrow buffers are read-only
    loss = preference_loss(loss_type, *t, beta=beta, **options).numpy()
    margin = beta * ((pc - rc) - (pr - rr))
    return {"loss": loss, "reward_accuracy": (margin > 0).astype(np.float64), "margin": margin}


def eval_rows(policy: Scored, ref: Scored, base: Scored, tokens: tuple[np.ndarray, np.ndarray], *,
              loss_type: str, beta: float, options: dict) -> dict[str, np.ndarray]:
    """Per-pair values of EVAL_METRICS."""
    vs_base = _implicit(policy, base, tokens, loss_type, beta, options)
    vs_ref = _implicit(policy, ref, tokens, loss_type, beta, options)
    return vs_base | {f"{k}_vs_ref": v for k, v in vs_ref.items()} | {
        "ranking_accuracy": (policy.chosen > policy.rejected).astype(np.float64),
        "logps_chosen": policy.chosen.astype(np.float64),
        "logps_rejected": policy.rejected.astype(np.float64),
    }


@dataclass
class EvalSums:
    """Per-source weighted sums of the per-pair metrics, added a batch (or a whole table) at a time."""

    sources: list[str]
    sums: np.ndarray = field(init=False)

    def __post_init__(self):
        self.sums = np.zeros((len(self.sources), 1 + len(EVAL_METRICS)))

    def add(self, rows: dict[str, np.ndarray], source_index: np.ndarray, weights: np.ndarray | None = None) -> None:
        w = np.ones(len(source_index)) if weights is None else np.asarray(weights, np.float64)
        for s in np.unique(source_index):
            sel = source_index == s
            self.sums[s, 0] += w[sel].sum()
            for j, name in enumerate(EVAL_METRICS, start=1):
                self.sums[s, j] += (rows[name][sel] * w[sel]).sum()

    def report(self) -> dict[str, float]:
        """`eval/<metric>` over all sources plus `eval/<source>/<metric>` per source (when several)."""

        def means(row: np.ndarray) -> dict[str, float]:
            n = row[0]
            return {k: (float(v / n) if n else float("nan")) for k, v in zip(EVAL_METRICS, row[1:], strict=True)}

        out = {f"eval/{k}": v for k, v in means(self.sums.sum(0)).items()}
        if len(self.sources) > 1:
            for i, name in enumerate(self.sources):
                if self.sums[i, 0] > 0:
                    out |= {f"eval/{name}/{k}": v for k, v in means(self.sums[i]).items()}
        out["eval/num_pairs"] = float(self.sums[:, 0].sum())
        return out
