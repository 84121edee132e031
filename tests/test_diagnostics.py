"""The gamma diagnostic and the held-out metrics against hand-computed values (arithmetic in docstrings)."""

import math

import numpy as np
import pytest

from sdpo import losses
from sdpo.diagnostics import EVAL_METRICS, EvalSums, Scored, eval_rows, gamma_stats, gamma_summary

A = np.array


# --------------------------------------------------------------------------------------------------
# gamma
# --------------------------------------------------------------------------------------------------
def test_gamma_stats_hand_computed():
    """[-3, -1, 0, 4]: mean = 0/4 = 0; median = (-1 + 0)/2 = -0.5;
    population variance = (9 + 1 + 0 + 16)/4 = 6.5, std = sqrt(6.5) = 2.549510."""
    s = gamma_stats(A([-3, -1, 0, 4]))
    assert s == {"mean": 0.0, "median": -0.5, "std": pytest.approx(math.sqrt(6.5))}
    assert s["std"] == pytest.approx(2.549510, abs=1e-6)


def test_gamma_stats_odd_count_and_list_input():
    """[1, 2, 2, 7, -5]: mean = 7/5 = 1.4; sorted [-5, 1, 2, 2, 7] -> median 2;
    deviations -0.4, 0.6, 0.6, 5.6, -6.4 -> squares 0.16 + 0.36 + 0.36 + 31.36 + 40.96 = 73.2,
    variance 73.2/5 = 14.64, std = sqrt(14.64) = 3.826225."""
    s = gamma_stats([1, 2, 2, 7, -5])
    assert s["mean"] == pytest.approx(1.4)
    assert s["median"] == 2.0
    assert s["std"] == pytest.approx(3.826225, abs=1e-6)


def test_gamma_stats_empty_is_nan():
    s = gamma_stats(np.zeros(0))
    assert set(s) == {"mean", "median", "std"}
    assert all(math.isnan(v) for v in s.values())


def test_gamma_summary_metrics_and_shared_edges():
    """ref = [-3, -1, 0, 4], base = [1, 2, 2, 7, -5]. Shared range over both: [-5, 7].
    bins=4 -> edges = linspace(-5, 7, 5) = [-5, -2, 1, 4, 7] (last bin closed):
      ref : -3 in [-5,-2); -1, 0 in [-2,1); none in [1,4); 4 in [4,7]      -> [1, 2, 0, 1]
      base: -5 in [-5,-2); none in [-2,1); 1, 2, 2 in [1,4); 7 in [4,7]    -> [1, 0, 3, 1]"""
    metrics, hists = gamma_summary(A([-3.0, -1, 0, 4]), A([1.0, 2, 2, 7, -5]), bins=4)
    assert set(metrics) == {f"gamma_{m}/{k}" for m in ("ref", "base") for k in ("mean", "median", "std")}
    assert metrics["gamma_ref/mean"] == 0.0
    assert metrics["gamma_ref/median"] == -0.5
    assert metrics["gamma_ref/std"] == pytest.approx(math.sqrt(6.5))
    assert metrics["gamma_base/mean"] == pytest.approx(1.4)
    assert metrics["gamma_base/median"] == 2.0
    assert metrics["gamma_base/std"] == pytest.approx(math.sqrt(14.64))
    assert set(hists) == {"ref", "base"}
    assert hists["ref"]["edges"] == pytest.approx([-5, -2, 1, 4, 7])
    assert hists["ref"]["edges"] == hists["base"]["edges"]
    assert hists["ref"]["counts"] == [1, 2, 0, 1]
    assert hists["base"]["counts"] == [1, 0, 3, 1]


def test_gamma_summary_default_bins_cover_every_value():
    """bins=50 -> 51 edges from the overall min to the overall max; every value lands in a bin."""
    rng = np.random.default_rng(0)
    ref, base = rng.normal(-30, 8, 997), rng.normal(-38, 10, 503)
    _, hists = gamma_summary(ref, base)
    edges = hists["ref"]["edges"]
    assert len(edges) == 51
    assert edges == hists["base"]["edges"]
    assert edges[0] == pytest.approx(min(ref.min(), base.min()))
    assert edges[-1] == pytest.approx(max(ref.max(), base.max()))
    assert len(hists["ref"]["counts"]) == len(hists["base"]["counts"]) == 50
    assert sum(hists["ref"]["counts"]) == 997
    assert sum(hists["base"]["counts"]) == 503


def test_gamma_summary_without_base():
    """base=None: only the ref keys; edges span ref alone: linspace(-3, 4, 8) = [-3, -2, ..., 4]."""
    metrics, hists = gamma_summary(A([-3.0, -1, 0, 4]), None, bins=7)
    assert set(metrics) == {"gamma_ref/mean", "gamma_ref/median", "gamma_ref/std"}
    assert set(hists) == {"ref"}
    assert hists["ref"]["edges"] == pytest.approx([-3, -2, -1, 0, 1, 2, 3, 4])
    # -3 -> [-3,-2), -1 -> [-1,0), 0 -> [0,1), 4 -> [3,4] (closed)
    assert hists["ref"]["counts"] == [1, 0, 1, 1, 0, 0, 1]


def test_gamma_summary_constant_values():
    """All values 2: min == max, so the edges span [2, 2 + 1] and every value falls in the first bin."""
    metrics, hists = gamma_summary(A([2.0, 2.0, 2.0]), None, bins=10)
    assert metrics["gamma_ref/std"] == 0.0
    assert len(hists["ref"]["edges"]) == 11
    assert hists["ref"]["edges"][0] == 2.0 and hists["ref"]["edges"][-1] == pytest.approx(3.0)
    assert hists["ref"]["counts"] == [3] + [0] * 9


def test_gamma_summary_nothing_or_empty():
    assert gamma_summary(None, None) == ({}, {})
    metrics, hists = gamma_summary(np.zeros(0), None)
    assert all(math.isnan(metrics[f"gamma_ref/{k}"]) for k in ("mean", "median", "std"))
    assert hists == {}


# --------------------------------------------------------------------------------------------------
# eval_rows
# --------------------------------------------------------------------------------------------------
POLICY = Scored(A([-10.0, -20.0]), A([-12.0, -18.0]))
REF = Scored(A([-11.0, -20.0]), A([-11.0, -20.0]))
BASE = Scored(A([-14.0, -19.0]), A([-12.0, -19.0]))
TOKENS = (A([4, 0]), A([2, 5]))


def test_eval_rows_sigmoid_hand_computed():
    """beta = 0.1, rho = (pi_c - m_c) - (pi_r - m_r) for m = base / ref.

    vs base:
      pair 0: (-10 + 14) - (-12 + 12) = 4 - 0 = 4   -> margin 0.4,  loss log(1 + e^-0.4) = log(1.670320) = 0.513015
      pair 1: (-20 + 19) - (-18 + 19) = -1 - 1 = -2 -> margin -0.2, loss log(1 + e^0.2)  = log(2.221403) = 0.798139
    vs ref:
      pair 0: (-10 + 11) - (-12 + 11) = 1 + 1 = 2   -> margin 0.2,  loss log(1 + e^-0.2) = log(1.818731) = 0.598139
      pair 1: (-20 + 20) - (-18 + 20) = 0 - 2 = -2  -> margin -0.2, loss 0.798139
    ranking: -10 > -12 yes, -20 > -18 no -> [1, 0]; logps are the policy's own sums."""
    r = eval_rows(POLICY, REF, BASE, TOKENS, loss_type="sigmoid", beta=0.1, options={})
    assert set(r) == set(EVAL_METRICS)
    assert r["margin"] == pytest.approx([0.4, -0.2])
    assert r["loss"] == pytest.approx([0.513015, 0.798139], abs=1e-6)
    assert r["reward_accuracy"].tolist() == [1.0, 0.0]
    assert r["margin_vs_ref"] == pytest.approx([0.2, -0.2])
    assert r["loss_vs_ref"] == pytest.approx([0.598139, 0.798139], abs=1e-6)
    assert r["reward_accuracy_vs_ref"].tolist() == [1.0, 0.0]
    assert r["ranking_accuracy"].tolist() == [1.0, 0.0]
    assert r["logps_chosen"].tolist() == [-10.0, -20.0]
    assert r["logps_rejected"].tolist() == [-12.0, -18.0]


def test_eval_rows_ipo_uses_per_token_means():
    """ipo ships with mean_logps: rho on means as above (vs ref 0.75, -0.4; vs base 1, -1.2), beta 0.1 ->
    (rho - 1/(2*0.1))^2 = (0.75 - 5)^2 = 18.0625, (-0.4 - 5)^2 = 29.16; vs base (1 - 5)^2 = 16, (-6.2)^2 = 38.44."""
    r = eval_rows(POLICY, REF, BASE, TOKENS, loss_type="ipo", beta=0.1, options={})
    assert r["loss_vs_ref"] == pytest.approx([18.0625, 29.16])
    assert r["loss"] == pytest.approx([16.0, 38.44])
    assert all(r[k].dtype == np.float64 and r[k].shape == (2,) for k in EVAL_METRICS)


def test_eval_rows_sum_loss_ignores_token_counts():
    """A sum-aggregation loss never looks at the token counts."""
    a = eval_rows(POLICY, REF, BASE, TOKENS, loss_type="sigmoid", beta=0.1, options={})
    b = eval_rows(POLICY, REF, BASE, (A([1, 1]), A([100, 3])), loss_type="sigmoid", beta=0.1, options={})
    for k in EVAL_METRICS:
        assert a[k].tolist() == b[k].tolist(), k


def test_eval_rows_label_smoothing():
    """eps = 0.1: loss = 0.9 * log(1 + e^-z) + 0.1 * log(1 + e^z), z = margin (beta*rho); margins unchanged.
      vs base pair 0, z = 0.4 : 0.9*0.513015 + 0.1*0.913015 = 0.461714 + 0.091302 = 0.553015
      vs base pair 1, z = -0.2: 0.9*0.798139 + 0.1*0.598139 = 0.718325 + 0.059814 = 0.778139
      vs ref  pair 0, z = 0.2 : 0.9*0.598139 + 0.1*0.798139 = 0.538325 + 0.079814 = 0.618139"""
    r = eval_rows(POLICY, REF, BASE, TOKENS, loss_type="sigmoid", beta=0.1, options={"label_smoothing": 0.1})
    assert r["loss"] == pytest.approx([0.553015, 0.778139], abs=1e-6)
    assert r["loss_vs_ref"] == pytest.approx([0.618139, 0.778139], abs=1e-6)
    assert r["margin"] == pytest.approx([0.4, -0.2])
    assert r["reward_accuracy"].tolist() == [1.0, 0.0]


def test_eval_rows_unknown_option_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        eval_rows(POLICY, REF, BASE, TOKENS, loss_type="sigmoid", beta=0.1, options={"gamma": 1.0})


def test_eval_rows_mean_aggregation_divides_by_token_counts(monkeypatch):
    """A loss with mean_logps=True (registered here: only `sigmoid` ships) compares per-token averages.
    Tokens: chosen [4, 0], rejected [2, 5]; a count of 0 divides by max(0, 1) = 1.
      policy means: pair 0: -10/4 = -2.5, -12/2 = -6;  pair 1: -20/1 = -20, -18/5 = -3.6
      ref means   : pair 0: -11/4 = -2.75, -11/2 = -5.5; pair 1: -20, -20/5 = -4
      base means  : pair 0: -14/4 = -3.5, -12/2 = -6;   pair 1: -19, -19/5 = -3.8
    vs ref : pair 0: (-2.5 + 2.75) - (-6 + 5.5) = 0.25 + 0.5 = 0.75 -> margin 0.075,
                     loss log(1 + e^-0.075) = log(1.927743) = 0.656350
             pair 1: (-20 + 20) - (-3.6 + 4) = 0 - 0.4 = -0.4     -> margin -0.04,
                     loss log(1 + e^0.04) = log(2.040811) = 0.713347
    vs base: pair 0: (-2.5 + 3.5) - (-6 + 6) = 1                 -> margin 0.1,  loss log(1.904837) = 0.644397
             pair 1: (-20 + 19) - (-3.6 + 3.8) = -1 - 0.2 = -1.2  -> margin -0.12, loss log(2.127497) = 0.754946
    ranking and logps stay on the sums: [1, 0], [-10, -20], [-12, -18]."""
    spec = losses.LossSpec("mean_sigmoid", losses.LOSSES["sigmoid"].fn, "sigmoid on means",
                           options=losses.LOSSES["sigmoid"].options, mean_logps=True)
    monkeypatch.setitem(losses.LOSSES, "mean_sigmoid", spec)
    r = eval_rows(POLICY, REF, BASE, TOKENS, loss_type="mean_sigmoid", beta=0.1, options={})
    assert r["margin_vs_ref"] == pytest.approx([0.075, -0.04])
    assert r["loss_vs_ref"] == pytest.approx([0.656350, 0.713347], abs=1e-6)
    assert r["reward_accuracy_vs_ref"].tolist() == [1.0, 0.0]
    assert r["margin"] == pytest.approx([0.1, -0.12])
    assert r["loss"] == pytest.approx([0.644397, 0.754946], abs=1e-6)
    assert r["reward_accuracy"].tolist() == [1.0, 0.0]
    assert r["ranking_accuracy"].tolist() == [1.0, 0.0]
    assert r["logps_chosen"].tolist() == [-10.0, -20.0]
    assert r["logps_rejected"].tolist() == [-12.0, -18.0]


def test_eval_rows_accepts_read_only_arrays():
    """Arrow hands out read-only numpy buffers; eval_rows must not write into them."""
    def frozen(s):
        c, r = s.chosen.copy(), s.rejected.copy()
        c.flags.writeable = r.flags.writeable = False
        return Scored(c, r)

    tokens = tuple(t.copy() for t in TOKENS)
    for t in tokens:
        t.flags.writeable = False
    r = eval_rows(frozen(POLICY), frozen(REF), frozen(BASE), tokens, loss_type="sigmoid", beta=0.1, options={})
    assert r["margin"] == pytest.approx([0.4, -0.2])


# --------------------------------------------------------------------------------------------------
# EvalSums
# --------------------------------------------------------------------------------------------------
def rows_from(values):
    """Metric j of EVAL_METRICS gets `values + 100*j`, so a mean of metric j is mean(values) + 100*j
    and any mix-up between metrics shows."""
    v = np.asarray(values, np.float64)
    return {name: v + 100 * j for j, name in enumerate(EVAL_METRICS)}


def expect(mean):
    return {name: pytest.approx(mean + 100 * j) for j, name in enumerate(EVAL_METRICS)}


def test_eval_sums_per_source_and_overall_over_batches():
    """Source a: values 1, 2, 3 (mean 2); source b: value 10 (mean 10). Streamed in two batches.
    Overall = (1 + 2 + 3 + 10)/4 = 16/4 = 4, not the mean of means (2 + 10)/2 = 6."""
    s = EvalSums(["a", "b"])
    s.add(rows_from([1, 10, 2]), A([0, 1, 0]))
    s.add(rows_from([3]), A([0]))
    out = s.report()
    assert {k: out[f"eval/{k}"] for k in EVAL_METRICS} == expect(4.0)
    assert {k: out[f"eval/a/{k}"] for k in EVAL_METRICS} == expect(2.0)
    assert {k: out[f"eval/b/{k}"] for k in EVAL_METRICS} == expect(10.0)
    assert out["eval/num_pairs"] == 4.0
    assert set(out) == ({f"eval/{k}" for k in EVAL_METRICS} | {f"eval/{s}/{k}" for s in "ab" for k in EVAL_METRICS}
                        | {"eval/num_pairs"})


def test_eval_sums_weights_and_zero_weight_rows():
    """Weights [1, 1, 0, 2] on values [1, 2, 1000, 10], sources [a, a, a, b]:
      a: (1*1 + 1*2 + 0*1000)/(1 + 1 + 0) = 3/2 = 1.5   (the padding row counts for nothing)
      b: (2*10)/2 = 10
      overall: (1 + 2 + 20)/(1 + 1 + 2) = 23/4 = 5.75; num_pairs = total weight = 4."""
    s = EvalSums(["a", "b"])
    s.add(rows_from([1, 2, 1000, 10]), A([0, 0, 0, 1]), A([1.0, 1.0, 0.0, 2.0]))
    out = s.report()
    assert {k: out[f"eval/{k}"] for k in EVAL_METRICS} == expect(5.75)
    assert {k: out[f"eval/a/{k}"] for k in EVAL_METRICS} == expect(1.5)
    assert {k: out[f"eval/b/{k}"] for k in EVAL_METRICS} == expect(10.0)
    assert out["eval/num_pairs"] == 4.0


def test_eval_sums_single_source_has_no_per_source_keys():
    """One source: values 1, 2 -> mean 1.5; only the overall keys."""
    s = EvalSums(["only"])
    s.add(rows_from([1, 2]), A([0, 0]))
    out = s.report()
    assert set(out) == {f"eval/{k}" for k in EVAL_METRICS} | {"eval/num_pairs"}
    assert {k: out[f"eval/{k}"] for k in EVAL_METRICS} == expect(1.5)
    assert out["eval/num_pairs"] == 2.0


def test_eval_sums_source_without_rows_is_omitted():
    """Sources a, b, c; rows only for a (value 4) and c (values 6, 8 -> mean 7): b has no keys.
    Overall: (4 + 6 + 8)/3 = 6."""
    s = EvalSums(["a", "b", "c"])
    s.add(rows_from([6, 4, 8]), A([2, 0, 2]))
    out = s.report()
    assert not any(k.startswith("eval/b/") for k in out)
    assert {k: out[f"eval/a/{k}"] for k in EVAL_METRICS} == expect(4.0)
    assert {k: out[f"eval/c/{k}"] for k in EVAL_METRICS} == expect(7.0)
    assert {k: out[f"eval/{k}"] for k in EVAL_METRICS} == expect(6.0)
    assert out["eval/num_pairs"] == 3.0


def test_eval_sums_with_eval_rows_end_to_end():
    """The two hand-computed pairs above (losses vs base 0.513015 and 0.798139) from sources a and b:
    overall loss = (0.513015 + 0.798139)/2 = 0.655577, reward accuracy 1/2, ranking accuracy 1/2."""
    s = EvalSums(["a", "b"])
    s.add(eval_rows(POLICY, REF, BASE, TOKENS, loss_type="sigmoid", beta=0.1, options={}), A([0, 1]))
    out = s.report()
    assert out["eval/loss"] == pytest.approx(0.655577, abs=1e-6)
    assert out["eval/reward_accuracy"] == 0.5
    assert out["eval/ranking_accuracy"] == 0.5
    assert out["eval/a/loss"] == pytest.approx(0.513015, abs=1e-6)
    assert out["eval/b/margin_vs_ref"] == pytest.approx(-0.2)
    assert out["eval/num_pairs"] == 2.0


def test_eval_sums_empty_report_is_nan():
    out = EvalSums(["a", "b"]).report()
    assert out["eval/num_pairs"] == 0.0
    assert all(math.isnan(out[f"eval/{k}"]) for k in EVAL_METRICS)
    assert not any(k.startswith(("eval/a/", "eval/b/")) for k in out)


def test_gamma_summary_counts_non_finite_values_and_keeps_the_histogram_finite():
    metrics, hists = gamma_summary(np.array([1.0, -np.inf, 2.0, np.nan]), np.array([0.0, 1.0]), bins=2)
    assert metrics["gamma_ref/non_finite"] == 2.0
    assert "gamma_base/non_finite" not in metrics
    assert np.isfinite(hists["ref"]["edges"]).all()
    assert sum(hists["ref"]["counts"]) == 2 and sum(hists["base"]["counts"]) == 2
