"""Splitting preference data into a held-out set and stage partitions. Pure NumPy, no Ray.

Every row gets two seeded 62-bit hash keys from its identity (source, file name, line): one decides
whether it is held out for evaluation, the other which partition it trains in. A split is then a set
of *cut-offs* on those keys, computed once from the keys alone:

- exact sizes: the cut-off between two parts is the key at the cumulative size's rank, so part j
  holds exactly `sizes[j]` rows (keys are distinct with overwhelming probability);
- streaming: assigning a row needs only its own keys and the cut-offs (a few integers per source),
  so the ingest pass can assign rows block by block without a shuffle;
- deterministic: the same rows and seed give the same split on any machine, whatever the file order
  or block layout.

Strategies: `natural` (one partition per source, in the listed order — the sDPO paper's split),
`random` (pool the sources, k parts), `stratified` (cut each source into k parts with the same
proportions, so every part has the same source mix — the paper's "sDPO Strat.").

Score strategies (`easy_to_hard`, `hard_to_easy`, `score_column`) cut on a per-pair score instead,
pooled or within each source, and a selection (`learnability_top`) first keeps the top share of the
training rows by learnability; the dropped rows are accounted for (`DROPPED`, `PartitionSpec.dropped`).
The score arithmetic is `sdpo.ranking`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sdpo import ranking

KEY_SPACE = 1 << 62  # keys lie in [0, KEY_SPACE); KEY_SPACE itself is the "after every key" cut-off
EVAL = -1  # partition index of held-out rows
UNUSED = -2  # rows of a source that the natural order leaves out
DROPPED = -3  # rows the selection (learnability_top) leaves out
SCORE_STRATEGIES = ("easy_to_hard", "hard_to_easy", "score_column")


def row_keys(source: str, file_name: str, line: int, seed: int) -> tuple[int, int]:
    """(eval key, split key) of a row; independent of each other and of the block layout."""
    digest = hashlib.blake2b(f"{seed}\x1f{source}\x1f{file_name}\x1f{line}".encode(), digest_size=16).digest()
    return (
        int.from_bytes(digest[:8], "little") % KEY_SPACE,
        int.from_bytes(digest[8:], "little") % KEY_SPACE,
    )


def split_sizes(n: int, proportions: Sequence[float]) -> list[int]:
    """Sizes summing to n, proportional to `proportions` (largest-remainder rounding, ties to the first)."""
    if n < 0 or not proportions or any(p <= 0 for p in proportions):
        raise ValueError(f"need n >= 0 and positive proportions, got n={n}, proportions={list(proportions)}")
    total = float(sum(proportions))
    exact = [n * p / total for p in proportions]
    sizes = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def stratified_sizes(source_sizes: Sequence[int], part_sizes: Sequence[int]) -> list[list[int]]:
    """Rows of each source in each part: row sums = source sizes, column sums = part sizes, exactly,
    and every cell the floor or the ceiling of n_s * S_j / N (a controlled rounding).

    Floors first; the leftover rows go to cells with a fractional remainder, largest first, and where
    that greedy pass gets stuck an alternating path moves earlier choices (bipartite flow with
    capacity 1 per cell, which always has a solution for integer margins).
    """
    n = sum(source_sizes)
    if n != sum(part_sizes):
        raise ValueError(f"source sizes {list(source_sizes)} and part sizes {list(part_sizes)} differ in total")
    rows, cols = range(len(source_sizes)), range(len(part_sizes))
    exact = [[ns * sj / n if n else 0.0 for sj in part_sizes] for ns in source_sizes]
    cells = [[int(x) for x in row] for row in exact]
    open_ = {(s, j) for s in rows for j in cols if exact[s][j] > cells[s][j]}  # may take one more row
    taken: set[tuple[int, int]] = set()
    row_left = [ns - sum(cells[s]) for s, ns in zip(rows, source_sizes, strict=True)]
    col_left = [sj - sum(cells[s][j] for s in rows) for j, sj in zip(cols, part_sizes, strict=True)]
    for _, s, j in sorted((exact[s][j] - cells[s][j], s, j) for s, j in open_):
        if row_left[s] > 0 and col_left[j] > 0:
            taken.add((s, j))
            row_left[s] -= 1
            col_left[j] -= 1
    for s in rows:
        while row_left[s] > 0:
            path = _augmenting_path(s, open_, taken, col_left, len(part_sizes))
            if path is None:  # cannot happen for consistent margins; keep totals exact regardless
                raise ValueError(f"no controlled rounding for {list(source_sizes)} x {list(part_sizes)}")
            for a, j, b in path:  # row a takes column j from row b (b is None at the path's free end)
                taken.add((a, j))
                if b is None:
                    col_left[j] -= 1
                else:
                    taken.discard((b, j))
            row_left[s] -= 1
    for s, j in taken:
        cells[s][j] += 1
    return cells


def _augmenting_path(start, open_, taken, col_left, n_cols):
    """Breadth-first alternating path from row `start` to a column with room left."""
    parent: dict[int, tuple[int, int] | None] = {start: None}  # row -> (previous row, column)
    queue = [start]
    for a in queue:
        for j in range(n_cols):
            if (a, j) not in open_ or (a, j) in taken:
                continue
            if col_left[j] > 0:
                path, row, b = [], a, None
                path.append((a, j, None))
                while parent[row] is not None:
                    prev, col = parent[row]
                    path.append((prev, col, row))
                    row = prev
                return path
            for b in {r for r, c in taken if c == j}:
                if b not in parent:
                    parent[b] = (a, j)
                    queue.append(b)
    return None


def cutoffs(keys: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """Cut-offs c_1..c_{k-1} such that part j = {keys in [c_j, c_{j+1})} has exactly sizes[j] rows."""
    n = len(keys)
    if sum(sizes) != n:
        raise ValueError(f"sizes {list(sizes)} do not add up to {n} rows")
    bounds = np.cumsum(sizes)[:-1]
    inner = bounds[bounds < n]
    sorted_keys = np.partition(keys, inner) if len(inner) else keys
    return [int(sorted_keys[b]) if b < n else KEY_SPACE for b in bounds]


def eval_cutoff(keys: np.ndarray, fraction: float, cap: int | None) -> tuple[int, int]:
    """(cut-off, count): rows whose eval key is below the cut-off are held out."""
    n = len(keys)
    count = min(round(fraction * n), cap if cap is not None else n)
    if count == 0:
        return 0, 0
    if count >= n:
        return KEY_SPACE, n
    return int(np.partition(keys, count)[count]), count


@dataclass(frozen=True)
class PartitionSpec:
    """A complete split: cut-offs per source, small enough to ship to every Ray Data task."""

    strategy: str
    names: list[str]  # partition names, in stage order
    sizes: list[int]  # training pairs per partition
    eval_cut: dict[str, int]  # source -> eval cut-off
    eval_sizes: dict[str, int]  # source -> held-out pairs
    natural_index: dict[str, int] = field(default_factory=dict)  # natural: source -> partition
    split_cuts: dict[str, list[int]] = field(default_factory=dict)  # source (or "*") -> cut-offs
    unused: dict[str, int] = field(default_factory=dict)  # source -> rows not in any partition
    # score strategies: source (or "*") -> cut-offs on (order value, split key); order value = the
    # score, negated when `descending` (stage 1 gets the highest scores)
    score_cuts: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    descending: bool = True
    select_cut: tuple[float, int] | None = None  # selection: rows kept = at or past it on (learnability, key)
    dropped: dict[str, int] = field(default_factory=dict)  # source -> training rows the selection dropped

    @property
    def needs_scores(self) -> bool:
        return self.strategy in SCORE_STRATEGIES

    def assign(self, sources: np.ndarray, eval_keys: np.ndarray, split_keys: np.ndarray,
               scores: np.ndarray | None = None, learn: np.ndarray | None = None) -> np.ndarray:
        """Partition index per row: 0..k-1, EVAL, UNUSED or DROPPED. `scores` (score strategies) and
        `learn` (a selection) are per row; held-out rows' values are never read (NaN is fine)."""
        out = np.empty(len(sources), dtype=np.int64)
        for src in np.unique(sources):
            rows = sources == src
            src = str(src)
            part = np.full(int(rows.sum()), UNUSED, dtype=np.int64)
            if self.strategy == "natural":
                if src in self.natural_index:
                    part[:] = self.natural_index[src]
            elif self.needs_scores:
                cuts = self.score_cuts.get(src, self.score_cuts.get("*"))
                values = -scores[rows] if self.descending else scores[rows]
                part[:] = ranking.parts_by_order(values, split_keys[rows], cuts)
            else:
                cuts = self.split_cuts.get(src, self.split_cuts.get("*"))
                part[:] = np.searchsorted(np.asarray(cuts, dtype=np.int64), split_keys[rows], side="right")
            if self.select_cut is not None:
                part[~ranking.at_or_past(learn[rows], split_keys[rows], self.select_cut)] = DROPPED
            part[eval_keys[rows] < self.eval_cut.get(src, 0)] = EVAL
            out[rows] = part
        return out


def plan_partitions(
    keys: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    strategy: str,
    order: Sequence[str] | None = None,
    num_parts: int | None = None,
    proportions: Sequence[float] | str | None = None,
    eval_fraction: float = 0.0,
    eval_cap: int | None = None,
    scores: dict[str, np.ndarray] | None = None,
    descending: bool = True,
    within_source: bool = False,
    learn: dict[str, np.ndarray] | None = None,
    keep_fraction: float | None = None,
) -> PartitionSpec:
    """Compute a split from each source's (eval keys, split keys) of its valid rows.

    `keys` is ordered as the sources are listed in the job. Score strategies need `scores` (per source,
    aligned with its keys; held-out rows may be NaN); a selection needs `learn` and `keep_fraction`:
    the top `keep_fraction` of all training rows by learnability are kept, the rest dropped, and the
    strategy then splits the kept rows.
    """
    eval_cut, eval_sizes, train = {}, {}, {}
    for src, (ek, _) in keys.items():
        eval_cut[src], eval_sizes[src] = eval_cutoff(ek, eval_fraction, eval_cap)
        train[src] = ek >= eval_cut[src]
    select_cut, dropped = None, {}
    if keep_fraction is not None:
        if learn is None:
            raise ValueError("a selection needs the learnability of every training row")
        pooled = [(learn[s][train[s]], keys[s][1][train[s]]) for s in keys]
        select_cut, _ = ranking.top_cut(*_concat(pooled), keep_fraction)
        for src in keys:
            kept = ranking.at_or_past(learn[src], keys[src][1], select_cut)
            dropped[src] = int((train[src] & ~kept).sum())
            train[src] &= kept
    train_keys = {src: sk[train[src]] for src, (_, sk) in keys.items()}
    common = dict(select_cut=select_cut, dropped=dropped)

    if strategy == "natural":
        names = list(order or keys)
        unused = {s: len(k) for s, k in train_keys.items() if s not in names}
        return PartitionSpec(
            strategy, names, [len(train_keys[s]) for s in names], eval_cut, eval_sizes,
            natural_index={s: i for i, s in enumerate(names)}, unused=unused, **common,
        )

    if proportions == "natural":
        props = [max(len(k), 1) for k in train_keys.values()]
    elif proportions is not None:
        props = list(proportions)
    else:
        props = [1.0] * (num_parts or 2)
    names = [f"part{i + 1}" for i in range(len(props))]
    if strategy in SCORE_STRATEGIES:
        if scores is None:
            raise ValueError(f"strategy {strategy} needs a score for every training row")
        sign = -1.0 if descending else 1.0
        sizes, cuts = _score_cuts({s: (sign * scores[s][train[s]], train_keys[s]) for s in keys}, props,
                                  within_source)
        return PartitionSpec(strategy, names, sizes, eval_cut, eval_sizes, score_cuts=cuts,
                             descending=descending, **common)
    if strategy == "random":
        pooled = np.concatenate(list(train_keys.values())) if train_keys else np.empty(0, np.int64)
        sizes = split_sizes(len(pooled), props)
        cuts = {"*": cutoffs(pooled, sizes)}
    elif strategy == "stratified":
        # Part sizes as a random split of the pool would have them (exact), each source spread evenly.
        sizes = split_sizes(sum(len(k) for k in train_keys.values()), props)
        table = stratified_sizes([len(k) for k in train_keys.values()], sizes)
        cuts = {s: cutoffs(train_keys[s], row) for s, row in zip(train_keys, table, strict=True)}
    else:
        raise ValueError(f"unknown split strategy {strategy!r}; use natural, random, stratified or one of "
                         f"{list(SCORE_STRATEGIES)}")
    return PartitionSpec(strategy, names, sizes, eval_cut, eval_sizes, split_cuts=cuts, **common)


def _score_cuts(ordered: dict[str, tuple[np.ndarray, np.ndarray]], props: list[float],
                within_source: bool) -> tuple[list[int], dict[str, list[tuple[float, int]]]]:
    """Part sizes and cut-offs on (order value, split key): pooled ("*"), or every source cut into the same
    proportions in its own order."""
    if within_source:
        table = {s: split_sizes(len(k), props) for s, (_, k) in ordered.items()}
        sizes = [int(x) for x in np.sum(list(table.values()), axis=0)] if table else [0] * len(props)
        return sizes, {s: ranking.order_cutoffs(v, k, table[s]) for s, (v, k) in ordered.items()}
    sizes = split_sizes(sum(len(k) for _, k in ordered.values()), props)
    return sizes, {"*": ranking.order_cutoffs(*_concat(list(ordered.values())), sizes)}


def _concat(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.empty(0, np.float64), np.empty(0, np.int64)
    return np.concatenate([v for v, _ in pairs]), np.concatenate([k for _, k in pairs])
