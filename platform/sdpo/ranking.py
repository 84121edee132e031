"""Per-pair scores and the arithmetic of ordering and selecting by them. Pure NumPy, no Ray, no torch.

Difficulty and learnability strategies (easy_to_hard, hard_to_easy, score_column, learnability_top)
split on a *score* instead of a hash key. Scores can tie (identical pairs, coarse user scores), so a
row's place in the order is the pair (value, split key): the split key is a seeded hash of the row's
identity, which makes every cut exact and the split deterministic whatever the block layout. A cut-off
is one such pair, and a row is at or past the cut-off when (value, key) >= (cut value, cut key)
lexicographically — a few floats and integers that every Ray Data task can carry.

Scores (see `sdpo.passes` for the passes that produce the log-probs):

- difficulty: the base model's implicit preference margin γ = log π(y_w|x) − log π(y_l|x) (summed
  completion log-probs), or its per-token variant (each log-prob divided by its completion's token
  count). High γ = the model already prefers the chosen response = easy.
- learnability (LoBaSS, arXiv 2310.13008, adapted to pairs): (L_init − L_ft) / L_init, L the pair's
  loss under the initial model and under the probe (the initial model briefly trained with DPO on all
  pairs). Which per-pair loss (`partitioning.selection.loss`):
  - `margin` (default): the logistic loss of the model's own margin, L = −log σ(β γ), i.e. the DPO loss
    against a reference without a preference. L_init differs per pair: ≈ 0 for pairs the initial model
    already ranks right by a wide margin (nothing left to learn), ln 2 for undecided pairs, more for
    pairs it ranks wrong. LoBaSS's ratio divides by L_init, which for an already-learnt pair is tiny, so
    shrinking a loss of 0.007 to 0.002 would score 0.7; the denominator is therefore floored at ln 2
    (an undecided pair's loss): learnability = (L_init − L_ft) / max(L_init, ln 2). Pairs the probe
    learnt score high, pairs it unlearnt (labels that fight the rest of the data) negative, pairs
    already learnt ≈ 0.
  - `dpo`: the pair's DPO loss with the initial model as the reference. Under the initial model every
    pair's loss is then exactly ln 2 (ρ = 0), so L_init = ln 2 and learnability = (ln 2 − L_ft) / ln 2,
    a monotone function of how far the probe moved the pair's margin. It cannot see that a pair was
    already learnt: such pairs move as easily as any (measured: pairs whose rejected response is the
    chosen one plus junk score *highest*), so it is an option, not the default.
  - `nll`: the chosen response's per-token NLL. The probe trains with DPO, which may lower the chosen
    likelihood too; use it with data where the chosen responses are what the model should write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LN2 = math.log(2.0)
AFTER_ALL = (math.inf, 1 << 62)  # a cut-off after every row: (value, key) never reaches it
BEFORE_ALL = (-math.inf, -1)  # a cut-off before every row


def margin(chosen_logps: np.ndarray, rejected_logps: np.ndarray, chosen_tokens: np.ndarray,
           rejected_tokens: np.ndarray, *, per_token: bool = False) -> np.ndarray:
    """γ per pair: summed log-probs, or per-token means (a longer rejected response then costs nothing)."""
    c, r = np.asarray(chosen_logps, np.float64), np.asarray(rejected_logps, np.float64)
    if per_token:
        c = c / np.maximum(np.asarray(chosen_tokens, np.float64), 1.0)
        r = r / np.maximum(np.asarray(rejected_tokens, np.float64), 1.0)
    return c - r


def learnability(init: dict[str, np.ndarray], probe: dict[str, np.ndarray], *, loss: str, beta: float) -> np.ndarray:
    """(L_init − L_ft) / L_init per pair from the two models' scores (`chosen_logps`, `rejected_logps`,
    `chosen_tokens` arrays, aligned). See the module docstring for the three losses."""
    c0, r0 = np.asarray(init["chosen_logps"], np.float64), np.asarray(init["rejected_logps"], np.float64)
    c1, r1 = np.asarray(probe["chosen_logps"], np.float64), np.asarray(probe["rejected_logps"], np.float64)
    if loss == "margin":
        l_init, l_ft = np.logaddexp(0.0, -beta * (c0 - r0)), np.logaddexp(0.0, -beta * (c1 - r1))  # −log σ(βγ)
        return (l_init - l_ft) / np.maximum(l_init, LN2)
    if loss == "dpo":
        l_ft = np.logaddexp(0.0, -beta * ((c1 - c0) - (r1 - r0)))  # −log σ(βρ), reference = the initial model
        return (LN2 - l_ft) / LN2
    if loss == "nll":
        tokens = np.maximum(np.asarray(init["chosen_tokens"], np.float64), 1.0)
        l_init, l_ft = -c0 / tokens, -c1 / tokens
        return (l_init - l_ft) / np.maximum(l_init, 1e-12)
    raise ValueError(f"unknown learnability loss {loss!r}; use margin, dpo or nll")


def at_or_past(values: np.ndarray, keys: np.ndarray, cut: tuple[float, int]) -> np.ndarray:
    """Whether (value, key) >= cut, lexicographically, per row."""
    v, k = np.asarray(values, np.float64), np.asarray(keys, np.int64)
    return (v > cut[0]) | ((v == cut[0]) & (k >= cut[1]))


def order_cutoffs(values: np.ndarray, keys: np.ndarray, sizes: Sequence[int]) -> list[tuple[float, int]]:
    """Cut-offs c_1..c_{k-1} on (value, key), ascending: part j = rows in [c_j, c_{j+1}) holds sizes[j] rows."""
    n = len(values)
    if sum(sizes) != n:
        raise ValueError(f"sizes {list(sizes)} do not add up to {n} rows")
    v, k = np.asarray(values, np.float64), np.asarray(keys, np.int64)
    if np.isnan(v).any():
        raise ValueError("scores must be numbers; got NaN")
    order = np.lexsort((k, v))  # by value, ties by key
    bounds = np.cumsum(sizes)[:-1]
    return [(float(v[order[b]]), int(k[order[b]])) if b < n else AFTER_ALL for b in bounds]


def parts_by_order(values: np.ndarray, keys: np.ndarray, cuts: Sequence[tuple[float, int]]) -> np.ndarray:
    """Part index per row: how many cut-offs its (value, key) is at or past."""
    out = np.zeros(len(values), np.int64)
    for cut in cuts:
        out += at_or_past(values, keys, cut)
    return out


def top_cut(values: np.ndarray, keys: np.ndarray, fraction: float) -> tuple[tuple[float, int], int]:
    """(cut, kept): the rows whose (value, key) is at or past `cut` are the top `kept` =
    round(fraction * n) rows by value (at least one row when there are any)."""
    n = len(values)
    kept = min(n, max(1 if n else 0, round(fraction * n)))
    if kept == n:
        return BEFORE_ALL, n
    return order_cutoffs(values, keys, [n - kept, kept])[0], kept


def content_share(content_keys: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each row is in the `fraction` share picked by its content key (already a uniform hash):
    the same rows on every run and in every block, and countable in the driver from the keys alone."""
    return np.asarray(content_keys, np.int64) % (1 << 20) < round(fraction * (1 << 20))


def histogram(values: np.ndarray, bins: int = 30, edges: np.ndarray | None = None) -> dict:
    """{edges, counts} of the finite values (for summary.json and the report's plots)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if edges is None:
        if not len(v):
            return {"edges": [], "counts": []}
        lo, hi = float(v.min()), float(v.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts, edges = np.histogram(v, bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


class ScoreTable:
    """Scores by content key (sorted keys, binary search): how a Ray Data task finds the score of the row
    it holds without a join. 8 bytes of key plus 8 per score column and pair."""

    def __init__(self, content_keys: np.ndarray, columns: dict[str, np.ndarray]):
        order = np.argsort(np.asarray(content_keys, np.int64), kind="stable")
        self.keys = np.asarray(content_keys, np.int64)[order]
        self.columns = {name: np.asarray(values, np.float64)[order] for name, values in columns.items()}

    def get(self, name: str, content_keys: np.ndarray) -> np.ndarray:
        """The column's value per key; NaN for keys not in the table (held-out rows) or a missing column."""
        keys = np.asarray(content_keys, np.int64)
        out = np.full(len(keys), np.nan)
        if name not in self.columns or not len(self.keys):
            return out
        idx = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[idx] == keys
        out[found] = self.columns[name][idx[found]]
        return out
