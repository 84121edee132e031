"""Score-based splits and selection (sdpo.ranking, sdpo.partition): exact sizes, ordering, ties, within-source
cuts, top-p selection with every dropped row accounted for, and the learnability formulas."""

import math

import numpy as np
import pytest

from sdpo import ranking
from sdpo.partition import DROPPED, EVAL, plan_partitions

from .test_partition import COUNTS, keys_by_source, rows_for


def _scores(sources, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=len(sources))
    return np.round(values) if ties else values  # rounding makes many ties


def _split(sources, ek, sk, scores, learn=None, **kw):
    listing = list(COUNTS)
    spec = plan_partitions(
        keys_by_source(sources, ek, sk, listing), scores={s: scores[sources == s] for s in listing},
        learn=None if learn is None else {s: learn[sources == s] for s in listing}, **kw)
    return spec, spec.assign(sources, ek, sk, scores, learn)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("props", [None, [1, 2, 7]])
@pytest.mark.parametrize("strategy", ["easy_to_hard", "hard_to_easy"])
def test_score_split_is_complete_exact_and_ordered(strategy, props, ties):
    sources, ek, sk = rows_for()
    scores = _scores(sources, ties=ties)
    spec, parts = _split(sources, ek, sk, scores, strategy=strategy, num_parts=None if props else 3,
                         proportions=props, descending=strategy == "easy_to_hard", eval_fraction=0.05)
    train = parts != EVAL
    assert set(np.unique(parts)) <= set(range(len(spec.names))) | {EVAL}
    assert [int((parts == j).sum()) for j in range(len(spec.names))] == spec.sizes
    assert sum(spec.sizes) == int(train.sum())
    if props:
        assert spec.sizes == pytest.approx([train.sum() * p / 10 for p in props], abs=1)
    for j in range(len(spec.names) - 1):  # every row of part j is at least as easy (hard) as part j+1
        a, b = scores[parts == j], scores[parts == j + 1]
        assert a.min() >= b.max() if strategy == "easy_to_hard" else a.max() <= b.min()


def test_ties_are_broken_by_the_split_key_deterministically():
    sources, ek, sk = rows_for()
    scores = np.zeros(len(sources))  # every pair tied: the key decides, so the split is exact anyway
    spec, parts = _split(sources, ek, sk, scores, strategy="easy_to_hard", num_parts=4)
    assert [int((parts == j).sum()) for j in range(4)] == spec.sizes == [626, 625, 625, 625]
    perm = np.random.default_rng(1).permutation(len(sources))
    again = spec.assign(sources[perm], ek[perm], sk[perm], scores[perm])
    assert (again == parts[perm]).all()


def test_within_source_cuts_every_source_in_the_same_proportions():
    sources, ek, sk = rows_for()
    scores = _scores(sources) + np.where(sources == "alpha", 5.0, 0.0)  # alpha far easier than the rest
    spec, parts = _split(sources, ek, sk, scores, strategy="easy_to_hard", proportions=[1, 1],
                         within_source=True)
    for src, n in COUNTS.items():
        mine = parts[sources == src]
        assert sorted(np.bincount(mine, minlength=2)) == sorted([n // 2, n - n // 2])
        s = scores[sources == src]
        assert s[mine == 0].min() >= s[mine == 1].max()
    # pooled, the easy source would fill stage 1 alone
    _, pooled = _split(sources, ek, sk, scores, strategy="easy_to_hard", proportions=[1, 1])
    assert (pooled[sources == "alpha"] == 0).mean() > 0.8


@pytest.mark.parametrize("strategy", ["random", "natural", "easy_to_hard"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
def test_learnability_top_keeps_the_top_share_and_accounts_for_the_rest(strategy, fraction):
    sources, ek, sk = rows_for()
    learn = _scores(sources, seed=3, ties=True)
    spec, parts = _split(sources, ek, sk, _scores(sources), learn=learn, strategy=strategy,
                         eval_fraction=0.1, keep_fraction=fraction)
    train = parts != EVAL
    kept, dropped = train & (parts != DROPPED), parts == DROPPED
    n = int(train.sum())
    assert int(kept.sum()) == max(1, round(fraction * n)) == sum(spec.sizes)
    assert sum(spec.dropped.values()) == int(dropped.sum()) == n - int(kept.sum())
    assert spec.dropped == {s: int((dropped & (sources == s)).sum()) for s in COUNTS}
    if dropped.any():
        assert learn[kept].min() >= learn[dropped].max()
    # held-out rows are never dropped: the eval split does not depend on the selection
    assert ((parts == EVAL) == (ek < np.array([spec.eval_cut[s] for s in sources]))).all()


def test_score_strategy_without_scores_is_an_error():
    sources, ek, sk = rows_for()
    with pytest.raises(ValueError, match="needs a score"):
        plan_partitions(keys_by_source(sources, ek, sk, list(COUNTS)), strategy="easy_to_hard")


def test_margin_and_its_per_token_variant():
    g = ranking.margin(np.array([-10.0, -4.0]), np.array([-12.0, -2.0]), np.array([5, 2]), np.array([4, 1]))
    assert g.tolist() == [2.0, -2.0]
    g = ranking.margin(np.array([-10.0]), np.array([-12.0]), np.array([5]), np.array([4]), per_token=True)
    assert g.tolist() == [pytest.approx(-2.0 + 3.0)]


def test_learnability_of_the_three_losses():
    init = {"chosen_logps": np.array([-10.0, -10.0, -10.0, -10.0]), "rejected_logps": np.array([-11.0, -11.0, -11.0, -60.0]),
            "chosen_tokens": np.array([5, 5, 5, 5])}
    probe = {"chosen_logps": np.array([-8.0, -10.0, -12.0, -10.0]), "rejected_logps": np.array([-11.0, -11.0, -9.0, -70.0]),
             "chosen_tokens": np.array([5, 5, 5, 5])}
    ln2 = math.log(2)
    dpo = ranking.learnability(init, probe, loss="dpo", beta=0.5)
    # rho = 2, 0, -4, 10: -log sigmoid(0.5 rho) = 0.313262, ln 2, 2.126928, 0.006715 (whatever the initial margin)
    assert dpo == pytest.approx([(ln2 - 0.3132617) / ln2, 0.0, (ln2 - 2.1269280) / ln2, (ln2 - 0.0067153) / ln2],
                                abs=1e-6)
    margin = ranking.learnability(init, probe, loss="margin", beta=0.5)
    # gamma 1 -> 3, 1 -> 1, 1 -> -3, 50 -> 60: losses 0.474077 -> 0.201413, =, -> 1.701413, ~1e-11 -> ~1e-13
    assert margin == pytest.approx([(0.4740770 - 0.2014133) / ln2, 0.0, (0.4740770 - 1.7014133) / ln2, 0.0],
                                   abs=1e-6)
    nll = ranking.learnability(init, probe, loss="nll", beta=0.5)
    assert nll == pytest.approx([0.2, 0.0, -0.2, 0.0])  # per-token NLL 2 -> 1.6, 2, 2.4, 2
    with pytest.raises(ValueError, match="unknown learnability loss"):
        ranking.learnability(init, probe, loss="kl", beta=0.5)


def test_score_table_finds_scores_by_content_key():
    table = ranking.ScoreTable(np.array([30, 10, 20]), {"difficulty": np.array([3.0, 1.0, 2.0])})
    got = table.get("difficulty", np.array([20, 99, 10, 30]))
    assert got[[0, 2, 3]].tolist() == [2.0, 1.0, 3.0] and math.isnan(got[1])
    assert np.isnan(table.get("learnability", np.array([10]))).all()


def test_content_share_picks_about_the_fraction_by_content():
    keys = np.random.default_rng(0).integers(0, 1 << 62, size=20000)
    for fraction in (0.25, 0.75, 1.0):
        share = ranking.content_share(keys, fraction)
        assert share.mean() == pytest.approx(fraction, abs=0.02)
        assert (share[::2] == ranking.content_share(keys[::2], fraction)).all()  # a row's own key decides
