"""Tuning the data schedule: the `sdpo tune SPACE.yaml` space file, a trial's config -> its job, and
the searchers' inputs. Pure Python, no Ray (`to_tune_param_space` imports ray.tune itself). The
experiment around the trials (how many run at once, results, best_job.yaml) is `sdpo.tune_results`.

One Tune trial is one sDPO job; one Tune iteration is one stage, so ASHA prunes at stage boundaries.
A space names a base job (`job:` a path relative to the space file, or a mapping), dotted overrides for
every trial (`set:`) and the dimensions (`search:`): `{choice|grid: [...]}`, `{uniform|loguniform|randint:
[lo, hi]}` (randint excludes hi, as in Tune), `{permutations: [names]}` (partition_order only) or a bare
scalar/list (fixed). Keys are dotted paths into the job (`loss.beta`, `stages.1.learning_rate` with a
0-based stage) or the schedule: `partition_order`, `num_stages`, `split_strategy` (see `_apply_schedule`).

Everything is checked when the file loads: each search key is applied to the base job and validated
(a typo such as `loss.betta` fails, naming the key), then every combination of the dimensions' values
(their ends for ranges, every value of a schedule key's randint; 50 seeded samples of a large space) is
turned into a job, so an impossible schedule fails before any compute. Across the trials, the load also
checks what makes them comparable: the metric is one every trial reports (`reported_metrics`), trials
ranked on a held-out metric share one held-out set, and ASHA only compares trials of one stage count.

Repeats: with num_samples > 1 every trial's config carries `sample` (its index; searcher grid: which
repeat of the grid), which names the trial apart from its repeats. A grid's repeat k trains with the
job's seed + k (unless `seed` is searched), so repeats measure seed variance; random and optuna samples
keep the job's seed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdpo import storage
from sdpo.config import ConfigError, JobConfig, SplitStrategy, load_yaml, parse_job

PARTITION_ORDER, NUM_STAGES, SPLIT_STRATEGY = "partition_order", "num_stages", "split_strategy"
LEARNABILITY_TOP = "learnability_top"  # split_strategy value: the base job's split after a learnability selection
SCORE_KEYS = ("difficulty", "within_source", "score_field", "score_order")
SCHEDULE_KEYS = (PARTITION_ORDER, NUM_STAGES, SPLIT_STRATEGY)
FORMS = ("choice", "grid", "uniform", "loguniform", "randint", "permutations")
RANGES = ("uniform", "loguniform", "randint")
SCHEDULE_FORMS = {PARTITION_ORDER: ("choice", "grid", "permutations", "fixed"),
                  NUM_STAGES: ("choice", "grid", "randint", "fixed"), SPLIT_STRATEGY: ("choice", "grid", "fixed")}
STAGE_KEY = re.compile(r"stages\.(\d+)\.(.+)")
MAX_PERMUTED = 7  # 5,040 orders
CHECK, CHECK_ALL, CHECK_SAMPLES = "check", 512, 50  # spaces up to 512 points are checked whole, larger ones by samples
SAMPLE = "sample"  # a trial config's sample index (num_samples > 1): names repeats apart; a grid's repeat seeds
# What a trial reports after each stage besides train/*, final/*, eval/* and gamma: the worker's stage
# summary (`worker._stage_summary` and what `worker.run_stage` adds) and the driver's wall time.
STAGE_SUMMARY = ("steps", "train_seconds", "first_step_loss", "pairs_per_s", "tokens_per_s", "pairs_trained",
                 "peak_rss_mib", "data_startup_s", "data_wait_s", "data_wait_fraction", "wall_seconds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------------------------------
# The space file
# --------------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Dimension(_Strict):
    """One searched key. `values`: the options (choice, grid), [lo, hi] (ranges), the names
    (permutations) or [the value] (fixed)."""

    form: Literal["choice", "grid", "uniform", "loguniform", "randint", "permutations", "fixed"]
    values: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, raw: Any) -> dict:
        if not isinstance(raw, dict):
            return {"form": "fixed", "values": [raw]}
        if len(raw) != 1 or next(iter(raw)) not in FORMS:
            raise ValueError(f"a dimension is one of {{{'|'.join(FORMS)}: ...}} or a fixed scalar/list; got the "
                             f"keys {sorted(raw)} (fixed mappings belong under `set`)")
        form, values = next(iter(raw.items()))
        if not isinstance(values, list) or not values:
            raise ValueError(f"{form} takes a non-empty list, got {values!r}")
        if form in RANGES:
            kind = int if form == "randint" else float
            if len(values) != 2 or not all(_is_number(v) and (kind is float or isinstance(v, int)) for v in values):
                raise ValueError(f"{form} takes [lo, hi], two {'integers' if kind is int else 'numbers'}; got {values}")
            if not values[0] < values[1] or (form == "loguniform" and values[0] <= 0):
                raise ValueError(f"{form} needs {'0 < ' if form == 'loguniform' else ''}lo < hi; got {values}")
        if form == "permutations":
            if not all(isinstance(v, str) for v in values) or len(set(values)) != len(values):
                raise ValueError(f"permutations takes distinct source names; got {values}")
            if len(values) > MAX_PERMUTED:
                raise ValueError(f"permutations of {len(values)} names is {math.factorial(len(values))} orders; "
                                 f"at most {MAX_PERMUTED} names (list the orders with choice instead)")
        return {"form": form, "values": values}

    @property
    def discrete(self) -> bool:
        return self.form not in RANGES

    @property
    def options(self) -> list:
        """The values of a discrete dimension (permutations: every order, as lists)."""
        if self.form == "permutations":
            return [list(p) for p in itertools.permutations(self.values)]
        if not self.discrete:
            raise ValueError(f"{self.form} is a range; it has no list of options")
        return copy.deepcopy(self.values)

    def corners(self) -> list:
        """What the load-time check tries: every option, or the two ends of a range."""
        if self.discrete:
            return self.options
        lo, hi = self.values
        return [lo, hi - 1] if self.form == "randint" else [lo, hi]


def _checked(key: str, dim: Dimension) -> list:
    """The values of `key` the load-time check tries: a schedule key's randint (num_stages) whole, since
    one value in the middle of a range may not fit the sources where both ends do; else the corners."""
    if key in SCHEDULE_KEYS and dim.form == "randint":
        return list(range(*dim.values))
    return dim.corners()


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, gt=0, description="asha: stages every trial runs before it may be stopped.")
    reduction_factor: float = Field(2, gt=1, description="asha: 1/reduction_factor of the trials go on at each rung.")

    @model_validator(mode="after")
    def _asha_only(self) -> SchedulerConfig:
        given = self.model_fields_set & {"grace_period", "reduction_factor"}
        if self.type == "fifo" and given:
            raise ValueError(f"{sorted(given)} apply to type asha, not fifo")
        return self


class TuneSpace(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the experiment and its trials' jobs.")
    job: dict[str, Any] = Field(description="The base job's raw mapping (a path in the file is read at load).")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set")
    search: dict[str, Dimension] = Field(min_length=1)
    searcher: Literal["random", "grid", "optuna"] = "random"
    scheduler: SchedulerConfig = SchedulerConfig()
    num_samples: int = Field(1, gt=0, description="random/optuna: trials; grid: repeats of the whole grid.")
    metric: str = Field("eval/reward_accuracy", min_length=1, description="One a trial reports (`reported_metrics`).")
    mode: Literal["max", "min"] | None = Field(None, description="Default: min for a loss, max for an accuracy or "
                                               "margin (other metrics need it); the other way round is refused.")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Default: what the cluster fits.")
    seed: int = 0

    @model_validator(mode="after")
    def _forms_fit_keys(self) -> TuneSpace:
        for key, dim in self.search.items():
            allowed = SCHEDULE_FORMS.get(key)
            if allowed and dim.form not in allowed:
                raise ValueError(f"search.{key}: {dim.form} is not allowed here; use one of {list(allowed)}")
            if dim.form == "permutations" and key != PARTITION_ORDER:
                raise ValueError(f"search.{key}: permutations is only for {PARTITION_ORDER}")
            if key.startswith("stages") and not STAGE_KEY.fullmatch(key):
                raise ValueError(f"search.{key}: per-stage keys are stages.<i>.<key>, i the 0-based stage index")
            if self.searcher == "grid" and not dim.discrete:
                raise ValueError(f"search.{key}: searcher grid enumerates values, {dim.form} is a range; list "
                                 "the values with choice or grid, or use searcher random or optuna")
        return self

    @cached_property
    def base_job(self) -> dict[str, Any]:
        """The base job's raw mapping with `set` applied; each trial overrides a copy of it."""
        raw = copy.deepcopy(self.job)
        for key, value in self.overrides.items():
            _set_key(raw, key, value, f"set.{key}")
        return raw

    @property
    def source_names(self) -> list[str]:
        return [s.get("name") for s in (self.base_job.get("data") or {}).get("sources") or []]


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid tune space"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            model = SchedulerConfig if loc[:1] == ["scheduler"] else TuneSpace
            msg = f"unknown key; allowed: {[f.alias or n for n, f in model.model_fields.items()]}"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {'.'.join(loc)}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def _read_job(value: Any, origin: str, base_dir: Path) -> dict:
    if value is None:
        raise ConfigError(f"{origin}: job: missing; give the base job as a path (relative to the space file) "
                          "or an inline mapping")
    if isinstance(value, dict):
        return copy.deepcopy(value)
    if not isinstance(value, str):
        raise ConfigError(f"{origin}: job: give the base job as a path (relative to the space file) or an inline "
                          f"mapping; got {type(value).__name__}")
    path = base_dir / value
    if not path.is_file():
        raise ConfigError(f"{origin}: job: {path} does not exist (a path is relative to the space file)")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: job: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: job: {path} is not a YAML mapping")
    return raw


def parse_space(raw: Any, *, origin: str = "space", base_dir: str | Path = ".", check: bool = True) -> TuneSpace:
    """Validate a space mapping: the schema, the base job (with `set`), each search key against the base
    job and, with `check`, every combination (`check_space`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a tune space is a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw, job=_read_job(raw.get("job"), origin, Path(base_dir)))
    try:
        space = TuneSpace.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None
    try:
        base = space.base_job
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    parse_job(base, origin=f"{origin}: job (with set)")
    _check_keys(space, origin)
    try:  # the metric on the first trial here, with a message about the metric alone; every trial in check_space
        _check_metric(space, _build(space, {k: _checked(k, d)[0] for k, d in space.search.items()}, CHECK))
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    space = space.model_copy(update={"mode": _mode(space, origin)})
    if not check:
        return space
    check_space(space)
    _check_comparable(space, origin)
    return space


# --------------------------------------------------------------------------------------------------
# What makes trials comparable: the metric, its mode, the held-out set and (ASHA) the stage count
# --------------------------------------------------------------------------------------------------
def metric_direction(metric: str) -> Literal["max", "min"] | None:
    """min for a loss (`eval/loss`, `train/loss`, `eval/easy/loss_vs_ref`), max for an accuracy or margin;
    None for the rest (log-probs, rewards, gamma, speeds), where the space must say."""
    last = metric.rsplit("/", 1)[-1]
    if last.startswith("loss") or last.endswith("_loss"):
        return "min"
    if last.startswith(("reward_accuracy", "ranking_accuracy", "accuracies", "margin")):
        return "max"
    return None


def _mode(space: TuneSpace, origin: str) -> str:
    direction = metric_direction(space.metric)
    if space.mode is None:
        if direction is None:
            raise ConfigError(f"{origin}: mode: {space.metric} has no natural direction; set mode: max or min")
        return direction
    if direction is not None and space.mode != direction:
        what = "a loss: lower is better" if direction == "min" else "higher is better"
        raise ConfigError(f"{origin}: mode: {space.metric} is {what}, so mode {space.mode} would rank the worst trial "
                          f"first; use mode: {direction} (or leave mode out)")
    return space.mode


def held_out(metric: str) -> bool:
    return metric.startswith(("eval/", "before/eval/"))


def reported_metrics(job: JobConfig) -> list[str]:
    """Every metric a trial of `job` reports after each stage (its stage record's, `pipeline.run_stage`):
    the stage summary, train/* and final/* (the stage's mean and last step), gamma_*/* (reference.gamma),
    and, with a held-out split, eval/* and before/eval/*, overall and per source (several sources)."""
    from sdpo.diagnostics import EVAL_METRICS
    from sdpo.training import TRAIN_METRICS

    out = [*STAGE_SUMMARY, *(f"{w}/{k}" for w in ("train", "final") for k in TRAIN_METRICS)]
    out += ["cuda_max_allocated_mib"] if job.scaling.use_gpu else []
    out += [f"gamma_{w}/{k}" for w in ("ref", "base") for k in ("mean", "median", "std")] if job.reference.gamma else []
    if job.data.eval.fraction > 0:
        names = [s.name for s in job.data.sources]
        scopes = [""] + ([f"{n}/" for n in names] if len(names) > 1 else [])
        out += [f"{b}eval/{scope}{k}" for b in ("", "before/") for scope in scopes for k in EVAL_METRICS]
        out += ["eval/num_pairs", "before/eval/num_pairs"]
    return out


def _check_metric(space: TuneSpace, job: JobConfig) -> None:
    reported = reported_metrics(job)
    if space.metric in reported:
        return
    if held_out(space.metric) and job.data.eval.fraction == 0:
        raise ConfigError(f"metric: {space.metric} is a held-out metric but data.eval.fraction is 0: no pair is "
                          "held out, so every trial would report NaN; set data.eval.fraction (e.g. 0.05) or rank "
                          "by a training metric (train/loss)")
    overall = [m for m in reported if m.startswith("eval/") and m.count("/") == 1]
    training = [m for m in reported if not held_out(m) and not m.startswith("final/")]
    raise ConfigError(f"metric: {space.metric} is not a metric trials report; held-out: {overall} (also before/eval/"
                      f"<m>{', and eval/<source>/<m> per source' if len(job.data.sources) > 1 else ''}); "
                      f"training: {training} (also final/<m> for the last step)")


def _check_comparable(space: TuneSpace, origin: str) -> None:
    """Across the trials: the held-out set is one (for a held-out metric) and ASHA's rungs compare trials
    at the same stage. Only the schedule and the partitioning/data keys change either."""
    base = parse_job(space.base_job, origin=origin)
    counts: dict[int, dict] = {}
    for point in _shape_points(space):
        job = _build(space, point, CHECK)
        counts.setdefault(job.num_partitions(), point)
        lost = [s.name for s in base.data.sources if s.name not in [t.name for t in job.data.sources]]
        if lost and held_out(space.metric):
            raise ConfigError(
                f"{origin}: the trial {point} pools only some sources, so {lost} would leave data.sources and "
                f"its held-out pairs with it: {space.metric} would rank trials on different held-out sets. A "
                f"subset order keeps every source's held-out pairs with split_strategy natural (and num_stages = "
                f"its length); with pooling strategies search orders of every source, or cut data.sources for "
                f"all trials with `set`")
    data_keys = [k for k in space.search if k.startswith("data.") and k != "data.max_rejected_fraction"]
    if data_keys and held_out(space.metric):
        raise ConfigError(f"{origin}: search.{data_keys[0]} changes the held-out pairs from trial to trial, so "
                          f"{space.metric} would rank trials on different held-out sets; fix it with `set`, or "
                          "rank by a training metric")
    most, (first, *rest) = max(counts), list(counts.values())
    if space.scheduler.type == "asha" and rest:
        keys = [k for k in _shape_keys(space) if any(p[k] != first[k] for p in rest)]
        shown = ", ".join(f"{n} stage(s): {({k: p[k] for k in keys})}" for n, p in sorted(counts.items()))
        raise ConfigError(
            f"{origin}: search.{'/'.join(keys)}: trials have {sorted(counts)} stages, and ASHA compares trials "
            f"at the same iteration (stage): a shorter trial's final metric would stop a longer one before its "
            f"later stages ({shown}). Use scheduler: {{type: fifo}}, or fix the stage count (e.g. num_stages)")
    if space.scheduler.type == "asha" and space.scheduler.grace_period > most:
        raise ConfigError(f"{origin}: scheduler.grace_period ({space.scheduler.grace_period}) exceeds the most "
                          f"stages a trial has ({most}), so ASHA could never stop a trial; lower it or use "
                          "scheduler: {type: fifo}")


def load_space(path: str | Path, *, check: bool = True) -> TuneSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune space {path} does not exist")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_space(raw, origin=str(path), base_dir=path.parent, check=check)


def _check_keys(space: TuneSpace, origin: str) -> None:
    """Each key alone, at its first value, on the base job: a typo fails here, named."""
    names = space.source_names
    for key, dim in space.search.items():
        for value in _checked(key, dim):
            if key == PARTITION_ORDER and (not isinstance(value, list) or not value
                                           or not set(value) <= set(names) or len(set(value)) != len(value)):
                raise ConfigError(f"{origin}: search.{key}: {value!r} is not a list of distinct source names "
                                  f"from {names}")
            if key == NUM_STAGES and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{origin}: search.{key}: {value!r} is not a positive integer")
            if key == SPLIT_STRATEGY and value not in [s.value for s in SplitStrategy] + [LEARNABILITY_TOP]:
                raise ConfigError(f"{origin}: search.{key}: {value!r} is not a split strategy; choose from "
                                  f"{[s.value for s in SplitStrategy] + [LEARNABILITY_TOP]}")
    schedule = {k: d.corners()[0] for k, d in space.search.items() if k in SCHEDULE_KEYS}
    for key, dim in space.search.items():
        point = schedule | {key: dim.corners()[0]}
        try:
            _build(space, point, CHECK)
        except ConfigError as err:
            raise ConfigError(f"{origin}: search.{key}: {point[key]!r} does not fit the base job\n{err}") from None


def _points(space: TuneSpace) -> Iterator[dict]:
    """Every combination of the dimensions' corners, or (past CHECK_ALL) every schedule combination plus
    CHECK_SAMPLES seeded samples."""
    keys = list(space.search)
    corners = [_checked(k, space.search[k]) for k in keys]
    if math.prod(len(c) for c in corners) <= CHECK_ALL:
        yield from (dict(zip(keys, combo, strict=True)) for combo in itertools.product(*corners))
        return
    first = {k: c[0] for k, c in zip(keys, corners, strict=True)}
    yield from _shape_points(space, first)
    yield from _key_points(space, [k for k in keys if k.startswith(("scaling.", "reference."))], first)
    rng = random.Random(space.seed)
    for _ in range(CHECK_SAMPLES):
        yield {k: rng.choice(c) for k, c in zip(keys, corners, strict=True)}


def _shape_keys(space: TuneSpace) -> list[str]:
    """The search keys that can change a trial's stages or sources: the schedule, partitioning.*, data.*."""
    return [k for k in space.search if k in SCHEDULE_KEYS or k.startswith(("partitioning.", "data."))]


def _key_points(space: TuneSpace, keys: list[str], rest: dict) -> Iterator[dict]:
    """Every combination of the checked values of `keys`, the other keys as in `rest`."""
    for combo in itertools.product(*(_checked(k, space.search[k]) for k in keys)):
        yield rest | dict(zip(keys, combo, strict=True))


def _shape_points(space: TuneSpace, rest: dict | None = None) -> Iterator[dict]:
    if rest is None:
        rest = {k: _checked(k, d)[0] for k, d in space.search.items()}
    yield from _key_points(space, _shape_keys(space), rest)


def check_space(space: TuneSpace) -> None:
    """Turn every point (see `_points`) into a job; raise on the first that cannot run (or does not report
    the metric), naming it."""
    for point in _points(space):
        try:
            _check_metric(space, _build(space, point, CHECK))
        except ConfigError as err:
            raise ConfigError(f"{space.name}: the search point {point} cannot run\n{err}") from None


def max_stages(space: TuneSpace) -> int:
    """The most stages any trial has (ASHA's max_t): only the schedule, partitioning and data keys change it."""
    return max(_build(space, p, CHECK).num_partitions() for p in _shape_points(space))


def resource_jobs(space: TuneSpace) -> list[JobConfig]:
    """The trials' jobs as far as their resources differ (searched scaling.* or reference.* keys): what
    `tune_results.plan_trials` plans for; the base job's alone when none is searched."""
    keys = [k for k in space.search if k.startswith(("scaling.", "reference."))]
    if not keys:
        return [_build(space, {k: _checked(k, d)[0] for k, d in space.search.items()}, CHECK)]
    return [_build(space, p, CHECK) for p in _key_points(space, keys, {k: _checked(k, d)[0]
                                                                        for k, d in space.search.items()})]


# --------------------------------------------------------------------------------------------------
# A trial's config -> its job
# --------------------------------------------------------------------------------------------------
def _set_key(raw: dict, key: str, value: Any, what: str) -> None:
    """Set `a.b.0.c` in a raw mapping, as `apply_overrides` does (list items by position)."""
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        last, here = i == len(parts) - 1, ".".join(parts[:i]) or "(top level)"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what}: {here} has no item {part} ({len(node)} items)")
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = copy.deepcopy(value)
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"{what}: {here} is a value, not a mapping")


def _apply_key(raw: dict, key: str, value: Any, what: str) -> None:
    if key == "loss.type" and value != (raw.get("loss") or {}).get("type", "sigmoid"):
        # another loss: the base job's options are the old loss's (as a stage's loss override does)
        old = raw.get("loss") or {}
        raw["loss"] = {"type": value} | ({"beta": old["beta"]} if "beta" in old else {})
        return
    _set_key(raw, key, value, what)


def _keep_sources(raw: dict, names: list[str]) -> None:
    data = raw["data"]
    unknown = [n for n in names if n not in [s.get("name") for s in data["sources"]]]
    if unknown:
        raise ConfigError(f"{PARTITION_ORDER}: {unknown} are not sources of the base job")
    data["sources"] = [s for s in data["sources"] if s.get("name") in names]


def _apply_schedule(raw: dict, point: dict) -> None:
    """The schedule keys -> `partitioning` (and `data.sources`). split_strategy sets the strategy.
    natural: partition_order is the order (a subset leaves the other sources unused); num_stages must be
    len(order), or 1: one stage on the ordered sources pooled (random, num_parts 1, `data.sources` cut to
    them, as random has no per-source filter). random/stratified: num_stages is num_parts (proportions
    dropped); partition_order only selects the pooled sources. The score strategies (easy_to_hard,
    hard_to_easy, score_column) are cut like random; learnability_top keeps the base job's strategy and adds
    its selection (`partitioning.selection`, settings from the base job)."""
    if not any(k in point for k in SCHEDULE_KEYS):
        return
    part = dict(raw.get("partitioning") or {})
    strategy = str(point.get(SPLIT_STRATEGY, part.get("strategy", "natural")))
    if strategy == LEARNABILITY_TOP:  # LoBaSS's selection, then the base job's own split of the kept pairs
        part["selection"] = dict(part.get("selection") or {}) | {"strategy": LEARNABILITY_TOP}
        strategy = str(part.get("strategy", "natural"))
    order, stages = point.get(PARTITION_ORDER), point.get(NUM_STAGES)
    if strategy not in ("easy_to_hard", "hard_to_easy", "score_column"):  # the score keys belong to those
        for key in SCORE_KEYS:
            part.pop(key, None)
    part["strategy"] = strategy
    if strategy == "natural":
        part.pop("num_parts", None)
        part.pop("proportions", None)
        if order is not None:
            part["order"] = list(order)
        ordered = part.get("order") or [s.get("name") for s in raw["data"]["sources"]]
        if stages is not None and stages != len(ordered):
            if stages != 1:
                why = f"{len(ordered)}: one stage per source, in order; 1: one stage on them all pooled"
                raise ConfigError(
                    f"{NUM_STAGES}={stages} does not fit {PARTITION_ORDER} {ordered} with {SPLIT_STRATEGY} natural: "
                    f"allowed {NUM_STAGES} {sorted({1, len(ordered)})} ({why if len(ordered) > 1 else '1 source'})")
            # one stage on every ordered source at once: plain DPO on all the data
            part = {"strategy": "random", "num_parts": 1} | {k: part[k] for k in ("seed", "selection") if k in part}
            _keep_sources(raw, ordered)
    else:
        selected = order if order is not None else part.get("order")
        part.pop("order", None)
        if selected is not None:  # random/stratified pool their sources: the order only selects them
            _keep_sources(raw, list(selected))
        if stages is not None:
            part["num_parts"] = stages
            part.pop("proportions", None)
    raw["partitioning"] = part


def _fit_stages(raw: dict, point: dict, stage_keys: list[str], origin: str) -> None:
    """Make `stages` one entry per stage of this trial, then apply the per-stage keys."""
    count = parse_job(raw | {"stages": None}, origin=origin).num_partitions()
    stages = [s or {} for s in raw.get("stages") or []]
    if any(stages[count:]):
        raise ConfigError(f"stages: the base job overrides {len(stages)} stages but this trial has {count}; "
                          f"drop the overrides past stage {count} or search them as stages.<i>.<key>")
    raw["stages"] = stages = stages[:count] + [{} for _ in range(count - len(stages))]
    for key in stage_keys:
        index, rest = STAGE_KEY.fullmatch(key).groups()
        if int(index) >= count:
            raise ConfigError(f"search.{key}: stage index {index} is out of range for a trial with {count} "
                              f"stage(s) (0-based: 0..{count - 1})")
        _apply_key(stages[int(index)], rest, point[key], f"search.{key}")


def _build(space: TuneSpace, point: dict, trial_id: str, sample: int = 0) -> JobConfig:
    origin = "the trial's job" if trial_id == CHECK else f"trial {trial_id}"
    raw = copy.deepcopy(space.base_job)
    _apply_schedule(raw, point)
    stage_keys = sorted(k for k in point if STAGE_KEY.fullmatch(k))
    plain = [k for k in point if k not in SCHEDULE_KEYS and k not in stage_keys]
    for key in sorted(plain, key=lambda k: (k != "loss.type", k)):  # a new loss type first, then its options
        _apply_key(raw, key, point[key], f"search.{key}")
    if stage_keys or raw.get("stages"):
        _fit_stages(raw, point, stage_keys, origin)
    if sample and space.searcher == "grid" and "seed" not in space.search:  # repeat k of the grid: seed + k
        raw["seed"] = int(raw.get("seed") or 0) + sample
    raw["name"] = f"{space.name}-{trial_id}"
    raw["output_dir"] = storage.join(raw.get("output_dir") or JobConfig.model_fields["output_dir"].default,
                                     space.name, trial_id)
    return parse_job(raw, origin=origin)


def trial_name(config: dict) -> str:
    """A trial's id from its config alone: 8 hex digits of the sorted JSON's sha256 (without `sample`),
    then `-<k>` for sample k > 0, so repeats of a point get their own ids and output folders."""
    point = {k: v for k, v in config.items() if k != SAMPLE}
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{digest}-{int(config[SAMPLE])}" if config.get(SAMPLE) else digest


def _point(space: TuneSpace, config: dict) -> dict:
    """The trial's value of every search key (`sample` kept aside, not a search key)."""
    config = decode_config(space, config)
    config.pop(SAMPLE, None)
    unknown = sorted(set(config) - set(space.search))
    if unknown:
        raise ConfigError(f"trial config: {unknown} are not search keys; the space searches {list(space.search)}")
    point = {}
    for key, dim in space.search.items():
        if key not in config and dim.form != "fixed":
            raise ConfigError(f"trial config: search key {key} has no value")
        point[key] = config.get(key, dim.values[0])
    return point


def trial_job(space: TuneSpace, config: dict, trial_id: str | None = None) -> JobConfig:
    """The job of one sampled point: `config` maps the search keys to values (fixed ones may be left out;
    optuna's encoded values are decoded). Named `<space>-<trial_id>`, writing to
    `<base output_dir>/<space>/<trial_id>`; trial_id defaults to `trial_name` of the point. `sample` in the
    config (num_samples > 1) is the repeat: with searcher grid, repeat k trains with the job's seed + k."""
    point, sample = _point(space, config), int(config.get(SAMPLE) or 0)
    trial_id = re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id) if trial_id else trial_name(point | {SAMPLE: sample})
    try:
        return _build(space, point, trial_id, sample)
    except ConfigError as err:
        raise ConfigError(f"{space.name}: the search point {point} cannot run\n{err}") from None


def stage_count(space: TuneSpace, config: dict) -> int:
    return trial_job(space, config).num_partitions()


# --------------------------------------------------------------------------------------------------
# Searchers
# --------------------------------------------------------------------------------------------------
def trial_count(space: TuneSpace) -> int:
    """How many trials the search runs: num_samples times every grid (searcher grid: every discrete
    dimension; random: the `grid` ones; optuna samples grids too)."""
    if space.searcher == "optuna":
        return space.num_samples
    grids = [len(d.options) for d in space.search.values()
             if d.form == "grid" or (space.searcher == "grid" and d.discrete and d.form != "fixed")]
    return space.num_samples * math.prod(grids)


def tune_num_samples(space: TuneSpace) -> int:
    """Tune's num_samples: 1 where the param space enumerates the samples itself (`sample`, a grid)."""
    return space.num_samples if space.searcher == "optuna" else 1


def grid_points(space: TuneSpace) -> list[dict]:
    """Every combination of the discrete dimensions (searcher grid; run num_samples times, see `sample`)."""
    ranges = [k for k, d in space.search.items() if not d.discrete]
    if ranges:
        raise ConfigError(f"search: {ranges} are ranges; a grid enumerates choice/grid/permutations or fixed values")
    keys = list(space.search)
    return [dict(zip(keys, c, strict=True)) for c in itertools.product(*(space.search[k].options for k in keys))]


def to_tune_param_space(space: TuneSpace) -> dict[str, Any]:
    """Ray Tune's `param_space` (flat keys). Searcher grid: every discrete dimension a grid_search. With
    num_samples > 1, `sample` is a grid of the sample indices (run with `tune_num_samples`, i.e. 1): the
    same trials as Tune's own num_samples, each config carrying its index. Searcher optuna has no
    param_space: use `OptunaSearch(space=optuna_define_by_run(space))`."""
    if space.searcher == "optuna":
        raise ConfigError("searcher optuna: pass OptunaSearch(space=optuna_define_by_run(space), ...) and leave "
                          "param_space empty (Tune refuses a space in both)")
    from ray import tune

    out: dict[str, Any] = {SAMPLE: tune.grid_search(list(range(space.num_samples)))} if space.num_samples > 1 else {}
    for key, dim in space.search.items():
        if dim.form == "fixed":
            out[key] = copy.deepcopy(dim.values[0])
        elif dim.form == "grid" or (space.searcher == "grid" and dim.discrete):
            out[key] = tune.grid_search(dim.options)
        elif dim.discrete:
            out[key] = tune.choice(dim.options)
        else:
            out[key] = getattr(tune, dim.form)(*dim.values)
    return out


def _encode(value: Any) -> Any:
    """Optuna's categorical values must be scalars: an order becomes `"easy,hard"`, other lists JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return json.dumps(value)


def decode_config(space: TuneSpace, config: dict) -> dict:
    """Undo `_encode` on a sampled config (a no-op on Tune's own configs)."""
    out = {}
    for key, value in config.items():
        dim = space.search.get(key)
        if dim is not None and dim.discrete and isinstance(value, str):
            value = {_encode(o): o for o in dim.options if not isinstance(o, str)}.get(value, value)
        out[key] = copy.deepcopy(value)
    return out


def optuna_define_by_run(space: TuneSpace) -> Callable[[Any], dict | None]:
    """A define-by-run function for Tune's OptunaSearch: choice, grid and permutations are categorical
    (grid is sampled, not enumerated), ranges are floats/ints; fixed values come back as constants, and
    with num_samples > 1 the optuna trial's number as `sample`."""

    def define(trial: Any) -> dict | None:
        fixed = {SAMPLE: trial.number} if space.num_samples > 1 else {}
        for key, dim in space.search.items():
            if dim.form == "fixed":
                fixed[key] = copy.deepcopy(dim.values[0])
            elif dim.discrete:
                trial.suggest_categorical(key, [_encode(o) for o in dim.options])
            elif dim.form == "randint":
                trial.suggest_int(key, dim.values[0], dim.values[1] - 1)  # optuna's high is inclusive
            else:
                trial.suggest_float(key, dim.values[0], dim.values[1], log=dim.form == "loguniform")
        return fixed or None

    return define
