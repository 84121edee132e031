"""Invariants of the seeded split (sdpo.partition) on synthetic rows keyed by `row_keys`."""

import functools
import math

import numpy as np
import pytest

from sdpo.partition import EVAL, KEY_SPACE, UNUSED, plan_partitions, row_keys, split_sizes

COUNTS = {"alpha": 1500, "beta": 700, "gamma": 301}  # 2501 rows, listed in "job" order


@functools.cache
def make_rows(counts: tuple[tuple[str, int], ...], seed: int):
    """(sources, eval keys, split keys) of fake rows `source.jsonl:line`, as the ingest pass computes them."""
    sources, ek, sk = [], [], []
    for src, n in counts:
        for line in range(1, n + 1):
            e, s = row_keys(src, f"{src}.jsonl", line, seed)
            sources.append(src)
            ek.append(e)
            sk.append(s)
    return np.asarray(sources, dtype=object), np.asarray(ek, dtype=np.int64), np.asarray(sk, dtype=np.int64)


def rows_for(counts=None, seed=0):
    sources, ek, sk = make_rows(tuple((counts or COUNTS).items()), seed)
    return sources.copy(), ek.copy(), sk.copy()


def keys_by_source(sources, ek, sk, order):
    """The `keys` argument of plan_partitions: per source, in the job's listing order."""
    return {s: (ek[sources == s], sk[sources == s]) for s in order if (sources == s).any()}


def split(sources, ek, sk, **kw):
    """Plan on these rows (sources listed as in COUNTS) and assign them; returns (spec, index per row)."""
    listing = [s for s in COUNTS if (sources == s).any()]
    spec = plan_partitions(keys_by_source(sources, ek, sk, listing), **kw)
    return spec, spec.assign(sources, ek, sk)


EVAL_SETTINGS = [
    dict(eval_fraction=0.0, eval_cap=None),
    dict(eval_fraction=0.05, eval_cap=None),
    dict(eval_fraction=0.1, eval_cap=40),
    dict(eval_fraction=1.0, eval_cap=10),
]
SPLITS = [
    dict(strategy="natural"),
    dict(strategy="natural", order=["gamma", "alpha"]),
    dict(strategy="random"),
    dict(strategy="random", num_parts=3),
    dict(strategy="random", proportions=[1, 2, 7]),
    dict(strategy="random", proportions="natural"),
    dict(strategy="stratified"),
    dict(strategy="stratified", num_parts=5),
    dict(strategy="stratified", proportions=[0.3, 0.3, 0.4]),
    dict(strategy="stratified", proportions="natural"),
]


def _id(d):
    return ",".join(f"{k}={v}" for k, v in d.items())


@pytest.mark.parametrize("ev", EVAL_SETTINGS, ids=_id)
@pytest.mark.parametrize("how", SPLITS, ids=_id)
def test_every_row_lands_in_exactly_one_place_with_exact_sizes(how, ev):
    """Disjoint + complete: eval + partitions + unused = all rows, and the assigned counts are
    exactly `spec.sizes`, `spec.eval_sizes` and `spec.unused` (no row is lost or double-counted)."""
    sources, ek, sk = rows_for()
    spec, parts = split(sources, ek, sk, **how, **ev)
    k = len(spec.names)
    assert len(parts) == len(sources)
    assert set(np.unique(parts)) <= {EVAL, UNUSED, *range(k)}
    assert [int((parts == j).sum()) for j in range(k)] == spec.sizes
    for src in COUNTS:
        mine = parts[sources == src]
        assert int((mine == EVAL).sum()) == spec.eval_sizes[src]
        assert int((mine == UNUSED).sum()) == spec.unused.get(src, 0)
    total = sum(spec.sizes) + sum(spec.eval_sizes.values()) + sum(spec.unused.values())
    assert total == len(sources)


@pytest.mark.parametrize("how", SPLITS, ids=_id)
def test_same_seed_same_split_different_seed_different_split(how):
    """The split is a pure function of (rows, seed): replanning reproduces it, another seed changes it."""
    a = split(*rows_for(seed=7), **how, eval_fraction=0.05)[1]
    b = split(*rows_for(seed=7), **how, eval_fraction=0.05)[1]
    c = split(*rows_for(seed=8), **how, eval_fraction=0.05)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("how", SPLITS, ids=_id)
def test_independent_of_row_order_and_block_layout(how):
    """Shuffling the rows (file order, block layout) gives every row the same assignment, also when
    the rows are assigned in small blocks against the one spec (the streaming ingest pass)."""
    sources, ek, sk = rows_for()
    _, expected = split(sources, ek, sk, **how, eval_fraction=0.05, eval_cap=50)

    perm = np.random.default_rng(3).permutation(len(sources))
    spec, shuffled = split(sources[perm], ek[perm], sk[perm], **how, eval_fraction=0.05, eval_cap=50)
    np.testing.assert_array_equal(shuffled, expected[perm])

    blocks = [spec.assign(sources[perm][i:i + 97], ek[perm][i:i + 97], sk[perm][i:i + 97])
              for i in range(0, len(perm), 97)]
    np.testing.assert_array_equal(np.concatenate(blocks), expected[perm])


def test_eval_keys_and_split_keys_are_distinct_and_in_range():
    """Keys lie in [0, KEY_SPACE) and differ between rows (the exact-size cut-offs rely on that)."""
    _, ek, sk = rows_for()
    for keys in (ek, sk):
        assert keys.min() >= 0 and keys.max() < KEY_SPACE
        assert len(np.unique(keys)) == len(keys)
    assert row_keys("alpha", "alpha.jsonl", 1, 0) != row_keys("alpha", "alpha.jsonl", 2, 0)
    assert row_keys("alpha", "alpha.jsonl", 1, 0) != row_keys("beta", "alpha.jsonl", 1, 0)


# --------------------------------------------------------------------------------------------------
# split_sizes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proportions", [[1], [1, 1], [1, 1, 1], [1, 2, 7], [0.1, 0.2, 0.7], [3.3, 1e-3, 5],
                                         [1] * 7, [2, 1]])
def test_split_sizes_sum_to_n_and_round_by_less_than_one(proportions):
    """Largest-remainder rounding: sizes add up to n, each within 1 of n * p / sum(p)."""
    total = sum(proportions)
    for n in [0, 1, 2, 5, 10, 99, 100, 101, 2501]:
        sizes = split_sizes(n, proportions)
        assert len(sizes) == len(proportions)
        assert sum(sizes) == n, (n, sizes)
        for size, p in zip(sizes, proportions, strict=True):
            assert size >= 0
            assert abs(size - n * p / total) < 1, (n, sizes)


def test_split_sizes_ties_go_to_the_first_parts():
    """10 rows in 3 equal parts: the spare row goes to the first part."""
    assert split_sizes(10, [1, 1, 1]) == [4, 3, 3]
    assert split_sizes(11, [1, 1, 1]) == [4, 4, 3]


@pytest.mark.parametrize("n, proportions", [(10, []), (10, [1, 0]), (10, [1, -2]), (-1, [1, 1])])
def test_split_sizes_rejects_bad_input(n, proportions):
    with pytest.raises(ValueError, match="positive proportions"):
        split_sizes(n, proportions)


@pytest.mark.parametrize("strategy", ["random", "stratified"])
@pytest.mark.parametrize("proportions", [[1, 0], [1, -1], []])
def test_bad_proportions_raise(strategy, proportions):
    """Zero, negative or no proportions are refused by the planner, not turned into empty parts."""
    with pytest.raises(ValueError):
        split(*rows_for(), strategy=strategy, proportions=proportions)


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="unknown split strategy"):
        split(*rows_for(), strategy="roundrobin")


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proportions", [None, [1, 1, 1], [1, 2, 7], [0.5, 0.25, 0.25, 3]])
def test_random_sizes_follow_proportions_of_the_pool(proportions):
    """random: the pooled training rows are cut into parts of split_sizes(pool, proportions)."""
    sources, ek, sk = rows_for()
    spec, _ = split(sources, ek, sk, strategy="random", proportions=proportions, eval_fraction=0.05)
    pool = len(sources) - sum(spec.eval_sizes.values())
    assert spec.sizes == split_sizes(pool, proportions or [1, 1])
    assert spec.names == [f"part{i + 1}" for i in range(len(spec.sizes))]


@pytest.mark.parametrize("proportions", [None, [1, 1, 1], [1, 2, 7], [0.5, 0.25, 0.25, 3]])
def test_stratified_keeps_each_source_share_in_every_part(proportions):
    """stratified: part sizes are the pool's exact split; each source's rows in part j are the floor
    or the ceiling of n_s * S_j / N (so within 2 rows of n_s * p_j / sum(p))."""
    sources, ek, sk = rows_for()
    spec, parts = split(sources, ek, sk, strategy="stratified", proportions=proportions, eval_fraction=0.05)
    props = proportions or [1, 1]
    total = sum(spec.sizes)
    assert spec.sizes == split_sizes(total, props)
    for src in COUNTS:
        mine = parts[sources == src]
        n_train = int((mine >= 0).sum())
        assert n_train == COUNTS[src] - spec.eval_sizes[src]
        for j, p in enumerate(props):
            got = int((mine == j).sum())
            exact = n_train * spec.sizes[j] / total
            assert math.floor(exact) <= got <= math.ceil(exact), (src, j)
            assert abs(got - n_train * p / sum(props)) < 2, (src, j)


def test_stratified_mix_differs_from_random():
    """Sanity check that the strategies differ: a random part's source mix is not pinned row-exact
    the way a stratified one is (here: with 10 parts some source is off its share by > 1 row)."""
    sources, ek, sk = rows_for()
    _, parts = split(sources, ek, sk, strategy="random", num_parts=10)
    deviations = [abs(int(((parts == j) & (sources == s)).sum()) - COUNTS[s] / 10)
                  for j in range(10) for s in COUNTS]
    assert max(deviations) > 1


@pytest.mark.parametrize("order", [None, ["alpha", "beta", "gamma"], ["gamma", "beta", "alpha"], ["beta"]])
def test_natural_puts_each_source_in_its_own_partition_in_order(order):
    """natural: partition i is exactly the training rows of order[i]; sources left out are unused."""
    sources, ek, sk = rows_for()
    spec, parts = split(sources, ek, sk, strategy="natural", order=order, eval_fraction=0.05, eval_cap=50)
    names = order or list(COUNTS)
    assert spec.names == names
    for i, src in enumerate(names):
        mine = parts[sources == src]
        assert set(np.unique(mine)) == {i, EVAL}
        assert spec.sizes[i] == COUNTS[src] - spec.eval_sizes[src]
    left_out = [s for s in COUNTS if s not in names]
    assert sorted(spec.unused) == sorted(left_out)
    for src in left_out:
        mine = parts[sources == src]
        assert set(np.unique(mine)) == {UNUSED, EVAL}
        assert spec.unused[src] == COUNTS[src] - spec.eval_sizes[src]


@pytest.mark.parametrize("fraction, cap", [(0.0, None), (0.05, None), (0.05, 20), (0.2, 1000), (0.5, 1),
                                           (1.0, None)])
def test_eval_fraction_and_cap_per_source(fraction, cap):
    """Each source holds out min(round(fraction * n), cap) rows, whatever the strategy."""
    sources, ek, sk = rows_for()
    for how in ({"strategy": "natural"}, {"strategy": "random"}, {"strategy": "stratified"}):
        spec, parts = split(sources, ek, sk, **how, eval_fraction=fraction, eval_cap=cap)
        for src, n in COUNTS.items():
            expected = min(round(fraction * n), n if cap is None else cap)
            assert spec.eval_sizes[src] == expected
            assert int((parts[sources == src] == EVAL).sum()) == expected


def test_eval_split_does_not_depend_on_the_partition_strategy():
    """The held-out rows are picked by the eval key alone: the same rows for every strategy."""
    sources, ek, sk = rows_for()
    held = [split(sources, ek, sk, strategy=s, eval_fraction=0.1)[1] == EVAL
            for s in ("natural", "random", "stratified")]
    np.testing.assert_array_equal(held[0], held[1])
    np.testing.assert_array_equal(held[0], held[2])


def test_random_proportions_natural_gives_the_natural_sizes():
    """random + proportions='natural': part sizes are the natural split's sizes."""
    sources, ek, sk = rows_for()
    natural, _ = split(sources, ek, sk, strategy="natural", eval_fraction=0.05, eval_cap=30)
    spec, _ = split(sources, ek, sk, strategy="random", proportions="natural", eval_fraction=0.05, eval_cap=30)
    assert spec.sizes == natural.sizes


def test_stratified_proportions_natural_gives_the_natural_sizes_here():
    """stratified + proportions='natural' on COUNTS: the natural sizes, and each part has every source."""
    sources, ek, sk = rows_for()
    natural, _ = split(sources, ek, sk, strategy="natural", eval_fraction=0.05, eval_cap=30)
    spec, parts = split(sources, ek, sk, strategy="stratified", proportions="natural",
                        eval_fraction=0.05, eval_cap=30)
    assert spec.sizes == natural.sizes
    for j in range(len(spec.sizes)):
        assert {str(s) for s in sources[parts == j]} == set(COUNTS)


def test_stratified_proportions_natural_exact_for_small_uneven_sources():
    """The documented contract ('the sizes the natural split would give') also when per-source
    rounding does not add up (18/47/15 rows rounded source by source would give 17/48/15)."""
    counts = {"alpha": 18, "beta": 47, "gamma": 15}
    sources, ek, sk = rows_for(counts)
    spec, parts = split(sources, ek, sk, strategy="stratified", proportions="natural")
    assert spec.sizes == [18, 47, 15]
    assert [int((parts == j).sum()) for j in range(3)] == [18, 47, 15]


@pytest.mark.parametrize("counts, num_parts", [
    ({"alpha": 2, "beta": 2, "gamma": 2}, 3),
    ({"alpha": 2, "beta": 3, "gamma": 3}, 4),
])
def test_stratified_small_sources_keep_exact_sizes_and_their_share(counts, num_parts):
    """Small sources: the parts still have the pooled sizes, and every source's rows in each part stay
    within 1 of its share (a table with both properties exists: [[1,1,0],[0,1,1],[1,0,1]] for 2/2/2)."""
    sources, ek, sk = rows_for(counts)
    spec, parts = split(sources, ek, sk, strategy="stratified", num_parts=num_parts)
    assert spec.sizes == split_sizes(sum(counts.values()), [1] * num_parts)
    for src, n in counts.items():
        for j in range(num_parts):
            assert abs(int(((parts == j) & (sources == src)).sum()) - n / num_parts) < 1, (src, j)
