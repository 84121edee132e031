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
(their ends for ranges; 50 seeded samples of a large space) is turned into a job, so an impossible
schedule fails before any compute.
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
from sdpo.config import ConfigError, JobConfig, SplitStrategy, parse_job

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
    metric: str = Field("eval/reward_accuracy", min_length=1)
    mode: Literal["max", "min"] = "max"
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
        raw = yaml.safe_load(path.read_text())
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
    if not check:
        return space
    check_space(space)
    most = max_stages(space)
    if space.scheduler.type == "asha" and space.scheduler.grace_period > most:
        raise ConfigError(f"{origin}: scheduler.grace_period ({space.scheduler.grace_period}) exceeds the most "
                          f"stages a trial has ({most}), so ASHA could never stop a trial; lower it or use "
                          "scheduler: {type: fifo}")
    return space


def load_space(path: str | Path, *, check: bool = True) -> TuneSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_space(raw, origin=str(path), base_dir=path.parent, check=check)


def _check_keys(space: TuneSpace, origin: str) -> None:
    """Each key alone, at its first value, on the base job: a typo fails here, named."""
    names = space.source_names
    for key, dim in space.search.items():
        for value in dim.corners():
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
    corners = [space.search[k].corners() for k in keys]
    if math.prod(len(c) for c in corners) <= CHECK_ALL:
        yield from (dict(zip(keys, combo, strict=True)) for combo in itertools.product(*corners))
        return
    first = {k: c[0] for k, c in zip(keys, corners, strict=True)}
    yield from _schedule_points(space, first)
    rng = random.Random(space.seed)
    for _ in range(CHECK_SAMPLES):
        yield {k: rng.choice(c) for k, c in zip(keys, corners, strict=True)}


def _schedule_points(space: TuneSpace, rest: dict) -> Iterator[dict]:
    keys = [k for k in space.search if k in SCHEDULE_KEYS]
    for combo in itertools.product(*(space.search[k].corners() for k in keys)):
        yield rest | dict(zip(keys, combo, strict=True))


def check_space(space: TuneSpace) -> None:
    """Turn every point (see `_points`) into a job; raise on the first that cannot run, naming it."""
    for point in _points(space):
        try:
            _build(space, point, CHECK)
        except ConfigError as err:
            raise ConfigError(f"{space.name}: the search point {point} cannot run\n{err}") from None


def max_stages(space: TuneSpace) -> int:
    """The most stages any trial has (ASHA's max_t): only the schedule keys change the stage count."""
    return max(_build(space, p, CHECK).num_partitions() for p in _schedule_points(space, {}))


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


def _build(space: TuneSpace, point: dict, trial_id: str) -> JobConfig:
    origin = "the trial's job" if trial_id == CHECK else f"trial {trial_id}"
    raw = copy.deepcopy(space.base_job)
    _apply_schedule(raw, point)
    stage_keys = sorted(k for k in point if STAGE_KEY.fullmatch(k))
    plain = [k for k in point if k not in SCHEDULE_KEYS and k not in stage_keys]
    for key in sorted(plain, key=lambda k: (k != "loss.type", k)):  # a new loss type first, then its options
        _apply_key(raw, key, point[key], f"search.{key}")
    if stage_keys or raw.get("stages"):
        _fit_stages(raw, point, stage_keys, origin)
    raw["name"] = f"{space.name}-{trial_id}"
    raw["output_dir"] = storage.join(raw.get("output_dir") or JobConfig.model_fields["output_dir"].default,
                                     space.name, trial_id)
    return parse_job(raw, origin=origin)


def trial_name(config: dict) -> str:
    """A trial's id from its config alone: 8 hex digits of the sorted JSON's sha256."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _point(space: TuneSpace, config: dict) -> dict:
    config = decode_config(space, config)
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
    `<base output_dir>/<space>/<trial_id>`; trial_id defaults to `trial_name` of the point."""
    point = _point(space, config)
    trial_id = re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id) if trial_id else trial_name(point)
    try:
        return _build(space, point, trial_id)
    except ConfigError as err:
        raise ConfigError(f"{space.name}: the search point {point} cannot run\n{err}") from None


def stage_count(space: TuneSpace, config: dict) -> int:
    return trial_job(space, config).num_partitions()


# --------------------------------------------------------------------------------------------------
# Searchers
# --------------------------------------------------------------------------------------------------
def grid_points(space: TuneSpace) -> list[dict]:
    """Every combination of the discrete dimensions (searcher grid; Tune repeats it num_samples times)."""
    ranges = [k for k, d in space.search.items() if not d.discrete]
    if ranges:
        raise ConfigError(f"search: {ranges} are ranges; a grid enumerates choice/grid/permutations or fixed values")
    keys = list(space.search)
    return [dict(zip(keys, c, strict=True)) for c in itertools.product(*(space.search[k].options for k in keys))]


def to_tune_param_space(space: TuneSpace) -> dict[str, Any]:
    """Ray Tune's `param_space` (flat keys). Searcher grid: every discrete dimension a grid_search.
    Searcher optuna has no param_space: use `OptunaSearch(space=optuna_define_by_run(space))`."""
    if space.searcher == "optuna":
        raise ConfigError("searcher optuna: pass OptunaSearch(space=optuna_define_by_run(space), ...) and leave "
                          "param_space empty (Tune refuses a space in both)")
    from ray import tune

    out: dict[str, Any] = {}
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
    (grid is sampled, not enumerated), ranges are floats/ints; fixed values come back as constants."""

    def define(trial: Any) -> dict | None:
        fixed = {}
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
