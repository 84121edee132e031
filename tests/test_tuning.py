"""`sdpo tune`'s pure parts: the space file, trial config -> job, searchers, trial resources, results."""

import copy
import csv
import io
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdpo.config import ConfigError, load_yaml, parse_job
from sdpo.plan import PlanError, plan_resources, plan_scoring
from sdpo.tune_results import (
    DRIVER_CPUS,
    TrialNeeds,
    autoscaled_trials,
    best_job_yaml,
    order_label,
    plan_trials,
    plot_metric,
    results_table,
    rows_markdown,
    write_results,
)
from sdpo.tuning import (
    check_space,
    decode_config,
    grid_points,
    load_space,
    max_stages,
    optuna_define_by_run,
    parse_space,
    reported_metrics,
    resource_jobs,
    stage_count,
    to_tune_param_space,
    trial_count,
    trial_job,
    trial_name,
    tune_num_samples,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "base",
    "model": {"path": "m"},
    "data": {"sources": [{"name": "easy", "path": "e.jsonl"}, {"name": "hard", "path": "h.jsonl"}]},
    "loss": {"type": "sigmoid", "beta": 0.1},
    "output_dir": "runs/base",
}
THREE = copy.deepcopy(BASE)
THREE["data"]["sources"].append({"name": "medium", "path": "m.jsonl"})
FIFO = {"scheduler": {"type": "fifo"}}  # trials of different stage counts: ASHA cannot compare them


def space(search, job=BASE, **top):
    return parse_space({"name": "exp", "job": copy.deepcopy(job), "search": search} | top)


def error(search, job=BASE, **top) -> str:
    with pytest.raises(ConfigError) as err:
        space(search, job, **top)
    return str(err.value)


# --------------------------------------------------------------------------------------------------
# The space file
# --------------------------------------------------------------------------------------------------
EXAMPLE = """\
# sdpo tune tune_spaces/orderings.yaml
name: orderings
job: ../jobs/base.yaml
set: {training.epochs: 2}
search:
  partition_order: {permutations: [easy, hard]}
  num_stages: {choice: [1, 2]}
  split_strategy: {choice: [natural, stratified, random]}
  loss.beta: {loguniform: [0.01, 0.5]}
  training.learning_rate: {choice: [1.0e-4, 1.0e-3]}
  loss.type: {choice: [sigmoid, ipo]}
searcher: random
scheduler: {type: fifo}
num_samples: 4
metric: eval/reward_accuracy
mode: max
max_concurrent_trials: null
seed: 0
"""


def write_example(tmp_path: Path, text: str = EXAMPLE, job: dict = BASE) -> Path:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "tune_spaces").mkdir()
    (tmp_path / "jobs" / "base.yaml").write_text(yaml.safe_dump(job))
    path = tmp_path / "tune_spaces" / "orderings.yaml"
    path.write_text(text)
    return path


def test_example_space_loads_with_job_relative_to_the_space_file(tmp_path):
    s = load_space(write_example(tmp_path))
    assert s.name == "orderings" and s.searcher == "random" and s.num_samples == 4
    assert s.scheduler.type == "fifo"
    assert s.job == BASE  # the raw base job, as written
    assert s.base_job["training"] == {"epochs": 2} and "training" not in s.job  # `set` applied to a copy
    assert s.search["partition_order"].options == [["easy", "hard"], ["hard", "easy"]]
    assert s.search["loss.beta"].form == "loguniform" and not s.search["loss.beta"].discrete
    assert max_stages(s) == 2


def test_a_space_file_reads_floats_without_a_dot_as_numbers(tmp_path):
    """`5e-7` in a space file is a number (YAML 1.1 would read it as a string), as in a job file."""
    text = EXAMPLE.replace("{choice: [1.0e-4, 1.0e-3]}", "{choice: [5e-7, 1e-6]}")
    assert text != EXAMPLE
    s = load_space(write_example(tmp_path, text))
    assert s.search["training.learning_rate"].options == [5e-7, 1e-6]


def test_every_space_shown_in_the_readme_loads():
    """The README's example spaces (fenced yaml with a `search:`), as if they lay in tune_spaces/."""
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "search:" in b]
    assert blocks
    for block in blocks:
        s = parse_space(load_yaml(block), origin="README", base_dir=ROOT / "tune_spaces")
        assert s.search


def test_the_quickstart_job_is_a_valid_base(tmp_path):
    text = EXAMPLE.replace("../jobs/base.yaml", str(ROOT / "jobs" / "quickstart.yaml"))
    (tmp_path / "s.yaml").write_text(text)
    s = load_space(tmp_path / "s.yaml")
    job = trial_job(s, {"partition_order": ["hard", "easy"], "num_stages": 2, "split_strategy": "natural",
                        "loss.beta": 0.05, "training.learning_rate": 1e-4, "loss.type": "ipo"})
    assert job.partitioning.order == ["hard", "easy"] and job.loss.type == "ipo" and job.loss.beta == 0.05


def test_defaults_and_inline_job():
    s = space({"loss.beta": 0.2})
    assert (s.searcher, s.num_samples, s.mode, s.metric, s.seed) == ("random", 1, "max", "eval/reward_accuracy", 0)
    assert s.max_concurrent_trials is None and s.search["loss.beta"].form == "fixed"
    assert trial_job(s, {}).loss.beta == 0.2  # fixed values may be left out of a trial config


@pytest.mark.parametrize("top, named", [
    ({"serch": {}}, ["serch", "unknown key", "search", "searcher"]),
    ({"searcher": "bayes"}, ["searcher", "'random', 'grid' or 'optuna'"]),
    ({"mode": "maximise"}, ["mode", "'max' or 'min'"]),
    ({"num_samples": 0}, ["num_samples", "greater than 0"]),
    ({"max_concurrent_trials": 0}, ["max_concurrent_trials"]),
    ({"scheduler": {"type": "asha", "grace": 1}}, ["scheduler.grace", "unknown key", "grace_period"]),
    ({"scheduler": {"type": "hyperband"}}, ["scheduler.type", "'asha' or 'fifo'"]),
    ({"scheduler": {"type": "fifo", "grace_period": 1}}, ["grace_period", "asha, not fifo"]),
    ({"scheduler": {"grace_period": 3}}, ["scheduler.grace_period (3)", "most stages a trial has (2)"]),
    ({"name": "a b"}, ["name"]),
])
def test_top_level_errors_name_the_key_and_what_is_allowed(top, named):
    msg = error({"loss.beta": {"choice": [0.1]}}, **top)
    for part in named:
        assert part in msg, msg


@pytest.mark.parametrize("search, named", [
    ({"num_stages": {"choise": [1, 2]}}, ["search.num_stages", "choice|grid|uniform", "choise"]),
    ({"loss.beta": {"choice": []}}, ["search.loss.beta", "non-empty list"]),
    ({"loss.beta": {"uniform": [0.5, 0.1]}}, ["search.loss.beta", "lo < hi"]),
    ({"loss.beta": {"loguniform": [0.0, 0.5]}}, ["search.loss.beta", "0 < lo < hi"]),
    ({"loss.beta": {"uniform": [0.1]}}, ["search.loss.beta", "[lo, hi]"]),
    ({"training.epochs": {"randint": [1.0, 3.5]}}, ["search.training.epochs", "two integers"]),
    ({"loss.type": {"permutations": ["a", "b"]}}, ["search.loss.type", "only for partition_order"]),
    ({"partition_order": {"permutations": ["easy", "easy"]}}, ["search.partition_order", "distinct"]),
    ({"partition_order": {"permutations": list("abcdefgh")}}, ["search.partition_order", "40320 orders"]),
    ({"num_stages": {"uniform": [1, 3]}}, ["search.num_stages", "uniform is not allowed", "randint"]),
    ({"split_strategy": {"permutations": ["a"]}}, ["search.split_strategy"]),
    ({"partition_order": {"choice": [["easy", "medium"]]}}, ["search.partition_order", "['easy', 'hard']"]),
    ({"partition_order": "easy"}, ["search.partition_order", "not a list"]),
    ({"num_stages": {"choice": [0, 1]}}, ["search.num_stages", "positive integer"]),
    ({"split_strategy": {"choice": ["natural", "shuffled"]}}, ["search.split_strategy", "stratified"]),
    ({"loss.betta": {"choice": [0.1]}}, ["search.loss.betta", "betta"]),
    ({"training.lr": {"choice": [1e-4]}}, ["search.training.lr", "training.lr: unknown key"]),
    ({"loss.beta": {"choice": [-1.0]}}, ["search.loss.beta", "greater than 0"]),
    ({"stages.x.learning_rate": 1e-4}, ["search.stages.x.learning_rate", "stages.<i>.<key>"]),
    ({"stages.2.learning_rate": 1e-4}, ["search.stages.2.learning_rate", "out of range", "2 stage(s)"]),
    ({"stages.0.lr": 1e-4}, ["search.stages.0.lr", "stages.0.lr: unknown key"]),
    ({"name.x": 1}, ["search.name.x", "name is a value, not a mapping"]),
])
def test_search_errors_name_the_key(search, named):
    msg = error(search)
    for part in named:
        assert part in msg, msg


def test_grid_searcher_refuses_ranges():
    msg = error({"loss.beta": {"loguniform": [0.01, 0.5]}}, searcher="grid")
    assert "search.loss.beta" in msg and "choice or grid" in msg


@pytest.mark.parametrize("job, named", [
    (None, "job: missing"),
    (7, "job: give the base job as a path"),
    ("nowhere.yaml", "does not exist (a path is relative to the space file)"),
])
def test_job_errors(job, named):
    with pytest.raises(ConfigError) as err:
        parse_space({"name": "exp", "job": job, "search": {"loss.beta": 0.1}})
    assert named in str(err.value)


def test_set_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"training\.lr: unknown key"):
        space({"loss.beta": 0.1}, set={"training.lr": 1})
    with pytest.raises(ConfigError, match=r"set\.name\.x: name is a value"):
        space({"loss.beta": 0.1}, set={"name.x": 1})
    with pytest.raises(ConfigError, match=r"set\.data\.sources\.5\.max_rows: data\.sources has no item 5"):
        space({"loss.beta": 0.1}, set={"data.sources.5.max_rows": 1})


def test_bad_yaml_and_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="a tune space is a YAML mapping"):
        load_space(tmp_path / "list.yaml")


# --------------------------------------------------------------------------------------------------
# Trial config -> job: the schedule
# --------------------------------------------------------------------------------------------------
def test_partition_order_sets_the_natural_order():
    s = space({"partition_order": {"permutations": ["easy", "hard"]}})
    job = trial_job(s, {"partition_order": ["hard", "easy"]})
    assert job.partitioning.strategy.value == "natural" and job.partitioning.order == ["hard", "easy"]
    assert job.num_partitions() == 2 and [x.name for x in job.data.sources] == ["easy", "hard"]


def test_a_subset_order_leaves_the_other_sources_unused_but_listed():
    s = space({"partition_order": {"choice": [["hard"], ["medium", "easy"]]}}, job=THREE, **FIFO)
    job = trial_job(s, {"partition_order": ["medium", "easy"]})
    assert job.partitioning.order == ["medium", "easy"] and job.num_partitions() == 2
    assert len(job.data.sources) == 3


def test_natural_one_stage_pools_the_ordered_sources():
    """num_stages 1 with a natural order: one stage of plain DPO on every ordered source at once."""
    s = space({"partition_order": {"permutations": ["easy", "hard"]}, "num_stages": {"choice": [1, 2]}}, **FIFO)
    pooled = trial_job(s, {"partition_order": ["hard", "easy"], "num_stages": 1})
    assert pooled.partitioning.strategy.value == "random" and pooled.partitioning.num_parts == 1
    assert pooled.partitioning.order is None and pooled.num_partitions() == 1
    assert [x.name for x in pooled.data.sources] == ["easy", "hard"]
    staged = trial_job(s, {"partition_order": ["hard", "easy"], "num_stages": 2})
    assert staged.partitioning.order == ["hard", "easy"] and staged.num_partitions() == 2


def test_pooling_a_subset_restricts_the_sources():
    """random has no per-source filter, so the sources left out of the order leave `data.sources` (and
    their held-out pairs with them: allowed only when the metric is not a held-out one)."""
    search = {"partition_order": {"choice": [["hard", "easy"]]}, "num_stages": 1}
    s = space(search, job=THREE, metric="train/loss")
    job = trial_job(s, {"partition_order": ["hard", "easy"]})
    assert [x.name for x in job.data.sources] == ["easy", "hard"] and job.num_partitions() == 1
    assert "['medium'] would leave data.sources" in error(search, job=THREE)


def test_natural_num_stages_must_match_the_order_or_be_one():
    msg = error({"partition_order": {"permutations": ["easy", "hard", "medium"]}, "num_stages": {"choice": [1, 2]}},
                job=THREE)
    assert "num_stages=2" in msg and "partition_order" in msg and "allowed num_stages [1, 3]" in msg
    # without partition_order, the order is the listed sources
    msg = error({"num_stages": {"choice": [3]}})
    assert "num_stages=3" in msg and "['easy', 'hard']" in msg and "[1, 2]" in msg


@pytest.mark.parametrize("strategy", ["random", "stratified"])
def test_random_and_stratified_take_num_stages_as_num_parts(strategy):
    job_raw = BASE | {"partitioning": {"strategy": "random", "proportions": [1, 2], "seed": 3}}
    search = {"split_strategy": {"choice": ["natural", strategy]}, "num_stages": {"choice": [1, 2, 3]},
              "partition_order": {"choice": [["easy", "hard"], ["hard"]]}}
    assert "num_stages=2 does not fit partition_order ['hard']" in error(search, job=job_raw)
    s = parse_space({"name": "exp", "job": job_raw, "search": search}, check=False)  # natural x 2 or 3: refused
    job = trial_job(s, {"split_strategy": strategy, "num_stages": 3, "partition_order": ["easy", "hard"]})
    p = job.partitioning
    assert (p.strategy.value, p.num_parts, p.proportions, p.order, p.seed) == (strategy, 3, None, None, 3)
    assert job.num_partitions() == 3
    subset = trial_job(s, {"split_strategy": strategy, "num_stages": 2, "partition_order": ["hard"]})
    assert [x.name for x in subset.data.sources] == ["hard"]  # the order selects the pooled sources
    natural = trial_job(s, {"split_strategy": "natural", "num_stages": 1, "partition_order": ["hard"]})
    assert natural.partitioning.strategy.value == "natural" and natural.partitioning.order == ["hard"]
    assert natural.partitioning.num_parts is None and natural.partitioning.proportions is None


def test_score_strategies_and_learnability_top_as_split_strategies():
    job_raw = BASE | {"partitioning": {"strategy": "easy_to_hard", "within_source": True,
                                       "selection": {"strategy": "all"}}}
    search = {"split_strategy": {"choice": ["natural", "easy_to_hard", "hard_to_easy", "learnability_top"]},
              "num_stages": 2}
    s = space(search, job=job_raw)
    e2h = trial_job(s, {"split_strategy": "easy_to_hard", "num_stages": 3}).partitioning
    assert (e2h.strategy.value, e2h.num_parts, e2h.within_source) == ("easy_to_hard", 3, True)
    natural = trial_job(s, {"split_strategy": "natural", "num_stages": 2}).partitioning
    assert natural.strategy.value == "natural" and not natural.within_source  # score keys dropped
    # learnability_top: the base job's own split (easy_to_hard here), after the selection
    top = trial_job(s, {"split_strategy": "learnability_top", "num_stages": 2}).partitioning
    assert (top.strategy.value, top.num_parts, top.selection.strategy) == ("easy_to_hard", 2, "learnability_top")
    on_natural = trial_job(space({"split_strategy": {"choice": ["learnability_top"]}}),
                           {"split_strategy": "learnability_top"}).partitioning
    assert (on_natural.strategy.value, on_natural.selection.strategy) == ("natural", "learnability_top")
    pooled = trial_job(space({"split_strategy": {"choice": ["learnability_top"]}, "num_stages": 1}),
                       {"split_strategy": "learnability_top", "num_stages": 1}).partitioning
    assert (pooled.strategy.value, pooled.num_parts, pooled.selection.strategy) == ("random", 1, "learnability_top")
    assert "needs score_field" in error({"split_strategy": {"choice": ["score_column"]}})


def test_split_strategy_alone_keeps_base_proportions():
    job_raw = BASE | {"partitioning": {"strategy": "random", "proportions": [1, 2, 1]}}
    s = space({"split_strategy": {"choice": ["random", "stratified"]}}, job=job_raw)
    assert trial_job(s, {"split_strategy": "stratified"}).partitioning.proportions == [1, 2, 1]


def test_stage_count_and_max_stages():
    s = space({"partition_order": {"choice": [["hard"], ["easy", "hard"]]},
               "split_strategy": {"choice": ["random", "stratified"]}, "num_stages": {"randint": [1, 5]}},
              metric="train/loss", **FIFO)
    config = {"partition_order": ["easy", "hard"], "split_strategy": "random", "num_stages": 4}
    assert stage_count(s, config) == 4 and stage_count(s, config | {"num_stages": 1}) == 1
    assert max_stages(s) == 4  # randint excludes hi
    natural = space({"partition_order": {"choice": [["hard"], ["easy", "hard"]]}}, **FIFO)
    assert max_stages(natural) == 2 and stage_count(natural, {"partition_order": ["hard"]}) == 1
    # every value of a num_stages range is checked: natural with 3 stages on 2 sources cannot run
    msg = error({"partition_order": {"choice": [["easy", "hard"]]}, "num_stages": {"randint": [1, 5]}}, **FIFO)
    assert "num_stages=3" in msg


def test_every_value_of_a_num_stages_range_is_checked():
    """A 3-source natural job takes 1 or 3 stages: [1, 4)'s ends fit, its middle (2) does not."""
    msg = error({"num_stages": {"randint": [1, 4]}}, job=THREE, **FIFO)
    assert "the search point {'num_stages': 2} cannot run" in msg and "allowed num_stages [1, 3]" in msg
    ok = space({"num_stages": {"randint": [1, 4]}, "split_strategy": "random"}, job=THREE, **FIFO)
    assert max_stages(ok) == 3


# --------------------------------------------------------------------------------------------------
# What makes trials comparable: ASHA's stage counts, the held-out set, the metric and its mode
# --------------------------------------------------------------------------------------------------
def test_asha_refuses_trials_of_different_stage_counts():
    """ASHA's rung at iteration 1 would hold a 1-stage trial's final metric and a 2-stage trial's first."""
    search = {"partition_order": {"permutations": ["easy", "hard"]}, "num_stages": {"choice": [1, 2]}}
    msg = error(search, searcher="grid")
    assert "search.num_stages: trials have [1, 2] stages" in msg and "scheduler: {type: fifo}" in msg
    assert max_stages(space(search, searcher="grid", **FIFO)) == 2
    assert space(search | {"num_stages": 2}).scheduler.type == "asha"  # one stage count: ASHA is fine
    assert "search.partition_order: trials have [1, 2] stages" in error(
        {"partition_order": {"choice": [["hard"], ["easy", "hard"]]}})
    assert "search.partitioning.num_parts" in error({"partitioning.num_parts": {"choice": [2, 3]}},
                                                      job=BASE | {"partitioning": {"strategy": "random"}})


def test_trials_ranked_on_a_held_out_metric_share_the_held_out_set():
    """natural [hard] keeps easy's held-out pairs (easy is only left untrained); random [hard] would cut
    data.sources to [hard], and its held-out set with it."""
    search = {"partition_order": {"choice": [["easy", "hard"], ["hard"]]}, "split_strategy": {"choice": ["natural", "random"]}}
    msg = error(search, searcher="grid", **FIFO)
    assert "'partition_order': ['hard'], 'split_strategy': 'random'" in msg and "['easy'] would leave" in msg
    assert "split_strategy natural" in msg
    natural = space({"partition_order": {"choice": [["easy", "hard"], ["hard"]]}}, **FIFO)
    for order in (["easy", "hard"], ["hard"]):
        assert [x.name for x in trial_job(natural, {"partition_order": order}).data.sources] == ["easy", "hard"]
    assert space(search, searcher="grid", metric="train/loss", **FIFO)  # a training metric: no held-out set
    msg = error({"data.eval.fraction": {"choice": [0.05, 0.1]}})
    assert "search.data.eval.fraction changes the held-out pairs" in msg
    assert space({"data.max_rejected_fraction": {"choice": [0.05, 0.1]}})


@pytest.mark.parametrize("top, named", [
    ({"metric": "eval/reward_acc"}, ["metric: eval/reward_acc is not a metric trials report",
                                     "'eval/reward_accuracy'", "'train/loss'", "eval/<source>/<m>"]),
    ({"metric": "eval/medium/reward_accuracy"}, ["is not a metric trials report"]),  # no source medium
    ({"metric": "gamma_ref/mean", "mode": "max", "set": {"reference.gamma": False}}, ["not a metric"]),
    ({"set": {"data.eval.fraction": 0}}, ["eval/reward_accuracy is a held-out metric but data.eval.fraction is 0",
                                          "NaN"]),
    ({"metric": "eval/loss", "mode": "max"}, ["eval/loss is a loss: lower is better", "use mode: min"]),
    ({"metric": "train/rewards/accuracies", "mode": "min"}, ["higher is better", "use mode: max"]),
    ({"metric": "eval/logps_chosen"}, ["eval/logps_chosen has no natural direction; set mode: max or min"]),
])
def test_the_metric_is_one_the_trials_report(top, named):
    msg = error({"loss.beta": {"choice": [0.1, 0.2]}}, **top)
    for part in named:
        assert part in msg, msg


def test_an_eval_split_emptied_by_one_trial_is_refused():
    msg = error({"data.eval.fraction": {"choice": [0.1, 0.0]}})
    assert "the search point {'data.eval.fraction': 0.0} cannot run" in msg and "data.eval.fraction is 0" in msg
    assert space({"data.eval.fraction": {"choice": [0.1, 0.0]}}, metric="train/loss")  # needs no held-out pairs


def test_mode_follows_the_metric():
    beta = {"loss.beta": {"choice": [0.1, 0.2]}}
    assert space(beta).mode == "max"  # eval/reward_accuracy
    for metric, mode in [("eval/loss", "min"), ("before/eval/hard/loss_vs_ref", "min"), ("train/loss", "min"),
                         ("first_step_loss", "min"), ("eval/easy/ranking_accuracy", "max"),
                         ("final/rewards/margins", "max"), ("eval/margin_vs_ref", "max")]:
        assert space(beta, metric=metric).mode == mode, metric
    assert space(beta, metric="eval/logps_chosen", mode="min").mode == "min"


def test_reported_metrics():
    names = reported_metrics(parse_job(BASE))
    assert {"eval/reward_accuracy", "before/eval/loss", "eval/easy/margin", "eval/num_pairs", "train/loss",
            "final/rewards/accuracies", "gamma_base/mean", "pairs_per_s"} <= set(names)
    assert "cuda_max_allocated_mib" not in names
    one = parse_job(BASE | {"data": {"sources": BASE["data"]["sources"][:1], "eval": {"fraction": 0}},
                            "scaling": {"use_gpu": True}, "reference": {"gamma": False}})
    names = reported_metrics(one)
    assert "cuda_max_allocated_mib" in names and not [n for n in names if "eval/" in n or "gamma" in n]


# --------------------------------------------------------------------------------------------------
# Trial config -> job: other keys, stages, names
# --------------------------------------------------------------------------------------------------
def test_per_stage_keys_fill_the_stage_list():
    s = space({"stages.1.learning_rate": {"grid": [1e-4, 1e-3]}, "stages.0.loss.beta": 0.3})
    job = trial_job(s, {"stages.1.learning_rate": 1e-3})
    assert len(job.stages) == 2 and job.stages[0].loss == {"beta": 0.3} and job.stages[1].learning_rate == 1e-3
    assert job.stage_loss(0).beta == 0.3 and job.stage_loss(1).beta == 0.1


def test_per_stage_key_out_of_range_for_some_trials_is_refused_at_load():
    msg = error({"num_stages": {"choice": [2, 1]}, "stages.1.learning_rate": 1e-4})
    assert "search.stages.1.learning_rate" in msg and "out of range for a trial with 1 stage(s)" in msg
    assert "'num_stages': 1" in msg  # the point is named


def test_base_stage_overrides_are_resized_to_the_trial():
    job_raw = BASE | {"stages": [{"beta": 0.2}]}
    s = space({"num_stages": {"choice": [2]}}, job=job_raw)
    assert [o.beta for o in trial_job(s, {"num_stages": 2}).stages] == [0.2, None]
    msg = error({"num_stages": {"choice": [1]}}, job=BASE | {"stages": [{}, {"beta": 0.2}]})
    assert "overrides 2 stages but this trial has 1" in msg
    shrunk = space({"num_stages": {"choice": [1]}}, job=BASE | {"stages": [{}, {}]})
    assert len(trial_job(shrunk, {"num_stages": 1}).stages) == 1


def test_a_new_loss_type_drops_the_old_loss_options():
    job_raw = BASE | {"loss": {"type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1}}
    s = space({"loss.type": {"choice": ["sigmoid", "ipo"]}}, job=job_raw)
    ipo = trial_job(s, {"loss.type": "ipo"}).loss
    assert ipo.type == "ipo" and ipo.beta == 0.2 and not ipo.model_extra
    assert trial_job(s, {"loss.type": "sigmoid"}).loss.options == {"label_smoothing": 0.1}


def test_check_space_names_an_invalid_combination():
    """Each key is fine alone; the check of every combination finds ipo x label_smoothing."""
    search = {"loss.type": {"choice": ["sigmoid", "ipo"]}, "loss.label_smoothing": {"choice": [0.0, 0.1]}}
    msg = error(search)
    assert "'loss.type': 'ipo'" in msg and "'loss.label_smoothing': 0.0" in msg and "label_smoothing" in msg
    s = parse_space({"name": "exp", "job": BASE, "search": search}, check=False)
    with pytest.raises(ConfigError, match="cannot run"):
        check_space(s)


def test_a_large_space_is_checked_by_samples_and_every_schedule():
    search = {"data.sources.0.max_rows": {"choice": list(range(1, 30))}, "loss.beta": {"uniform": [0.05, 0.5]},
              "training.learning_rate": {"choice": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4]}}
    assert space(search, metric="train/loss")  # 29 * 2 * 9 = 522 corners: sampled
    msg = error(search | {"partition_order": {"choice": [["easy", "hard"], ["hard", "easy"]]},
                          "num_stages": {"choice": [2, 3]}})
    assert "num_stages=3" in msg


def test_trial_names_are_deterministic_and_name_the_job():
    a = trial_name({"x": 1, "y": [1, 2]})
    assert a == trial_name({"y": [1, 2], "x": 1}) and len(a) == 8 and a != trial_name({"x": 2, "y": [1, 2]})
    s = space({"loss.beta": {"choice": [0.1, 0.2]}})
    job = trial_job(s, {"loss.beta": 0.2})
    assert job.name == f"exp-{trial_name({'loss.beta': 0.2})}"
    assert job.output_dir == f"runs/base/exp/{trial_name({'loss.beta': 0.2})}"
    assert trial_job(s, {"loss.beta": 0.2}, trial_id="driver 00001/x").name == "exp-driver_00001_x"


def test_repeats_of_a_grid_are_distinct_trials_with_their_own_seeds():
    """num_samples 2 of a grid: 4 trials, 4 ids and output folders; repeat k trains with seed + k."""
    pytest.importorskip("ray.tune")
    from ray.tune.search.variant_generator import generate_variants

    s = space({"num_stages": {"choice": [1, 2]}}, job=BASE | {"seed": 7}, searcher="grid", num_samples=2, **FIFO)
    assert tune_num_samples(s) == 1  # the param space enumerates the repeats itself
    configs = [c for _, c in generate_variants(to_tune_param_space(s))]
    assert sorted((c["sample"], c["num_stages"]) for c in configs) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    jobs = [trial_job(s, c) for c in configs]
    assert len({trial_name(c) for c in configs}) == 4 and len({j.output_dir for j in jobs}) == 4
    assert sorted((c["sample"], j.seed) for c, j in zip(configs, jobs, strict=True)) == [(0, 7), (0, 7), (1, 8), (1, 8)]
    assert trial_name({"sample": 0, "num_stages": 1}) == trial_name({"num_stages": 1})  # repeat 0: a plain run's id
    assert trial_name({"sample": 1, "num_stages": 1}) == trial_name({"num_stages": 1}) + "-1"
    assert stage_count(s, configs[0]) == configs[0]["num_stages"]
    best = parse_job(yaml.safe_load(best_job_yaml(s, {"sample": 1, "num_stages": 2})))
    assert best.seed == 8  # the best repeat reruns with its own seed
    searched = space({"seed": {"choice": [3, 4]}}, searcher="grid", num_samples=2)
    assert trial_job(searched, {"seed": 3, "sample": 1}).seed == 3  # a searched seed is the trial's own


def test_trial_count():
    """What `sdpo tune` caps the concurrent trials at: a share for a trial that never runs is wasted."""
    grid = {"partition_order": {"permutations": ["easy", "hard"]}, "loss.beta": {"choice": [0.1, 0.2, 0.3]},
            "training.epochs": 1}
    assert trial_count(space(grid, searcher="grid", num_samples=2)) == 2 * 2 * 3
    assert trial_count(space(grid, num_samples=5)) == 5  # random: choice is sampled
    assert trial_count(space(grid | {"loss.beta": {"grid": [0.1, 0.2]}}, num_samples=5)) == 10
    assert trial_count(space(grid, searcher="optuna", num_samples=4)) == 4


def test_random_and_optuna_samples_of_a_small_space_get_distinct_ids():
    pytest.importorskip("ray.tune")
    from ray.tune.search.variant_generator import generate_variants

    search = {"loss.beta": {"choice": [0.1]}, "training.learning_rate": {"choice": [1e-3]}}
    s = space(search, num_samples=3)
    configs = [c for _, c in generate_variants(to_tune_param_space(s))]
    assert len(configs) == 3 and len({trial_name(c) for c in configs}) == 3
    assert {trial_job(s, c).seed for c in configs} == {0}  # random samples keep the job's seed
    assert "sample" not in to_tune_param_space(space(search))  # num_samples 1: the configs are as before
    opt = space(search, searcher="optuna", num_samples=3)
    assert tune_num_samples(opt) == 3
    trial = FakeOptunaTrial()
    trial.number = 2
    assert optuna_define_by_run(opt)(trial) == {"sample": 2}


def test_trial_config_keys_are_checked():
    s = space({"loss.beta": {"choice": [0.1, 0.2]}, "training.epochs": 2})
    with pytest.raises(ConfigError, match=r"\['loss\.betta'\] are not search keys"):
        trial_job(s, {"loss.beta": 0.1, "loss.betta": 0.1})
    with pytest.raises(ConfigError, match="search key loss.beta has no value"):
        trial_job(s, {})
    assert trial_job(s, {"loss.beta": 0.1}).training.epochs == 2


def test_trial_job_does_not_touch_the_space():
    s = space({"partition_order": {"permutations": ["easy", "hard"]}, "num_stages": {"choice": [1, 2]},
               "stages.0.beta": 0.3}, **FIFO)
    before = copy.deepcopy(s.base_job)
    trial_job(s, {"partition_order": ["hard", "easy"], "num_stages": 1})
    assert s.base_job == before and s.search["partition_order"].values == ["easy", "hard"]


# --------------------------------------------------------------------------------------------------
# best_job.yaml
# --------------------------------------------------------------------------------------------------
def test_best_job_yaml_round_trips():
    s = space({"partition_order": {"permutations": ["easy", "hard"]}, "loss.beta": {"loguniform": [0.01, 0.5]},
               "stages.1.learning_rate": 1e-4})
    best = {"partition_order": ["hard", "easy"], "loss.beta": 0.0321}
    text = best_job_yaml(s, best, trial_id="t7", value=0.8125)
    assert text.splitlines()[0] == ("# sdpo run best_job.yaml  (best trial exp-t7 of tune experiment exp: "
                                    "eval/reward_accuracy=0.8125)")
    job = parse_job(yaml.safe_load(text))
    assert job.model_copy(update={"output_dir": "x"}) == trial_job(s, best, "t7").model_copy(update={"output_dir": "x"})
    assert job.output_dir == "runs/base/exp-best" and job.partitioning.order == ["hard", "easy"]
    assert job.stages[1].learning_rate == 1e-4 and job.loss.beta == 0.0321


# --------------------------------------------------------------------------------------------------
# Searchers
# --------------------------------------------------------------------------------------------------
def test_grid_points_are_the_cartesian_product():
    s = space({"partition_order": {"permutations": ["easy", "hard"]}, "num_stages": {"grid": [1, 2]},
               "loss.type": {"choice": ["sigmoid", "ipo"]}, "training.epochs": 1}, searcher="grid", **FIFO)
    points = grid_points(s)
    assert len(points) == 2 * 2 * 2
    assert {"partition_order": ["hard", "easy"], "num_stages": 1, "loss.type": "ipo", "training.epochs": 1} in points
    assert len({trial_name(p) for p in points}) == 8
    for p in points:
        trial_job(s, p)
    with pytest.raises(ConfigError, match=r"\['loss.beta'\] are ranges"):
        grid_points(space({"loss.beta": {"uniform": [0.1, 0.2]}}))


def test_to_tune_param_space():
    tune = pytest.importorskip("ray.tune")
    search = {"partition_order": {"permutations": ["easy", "hard"]}, "loss.type": {"choice": ["sigmoid", "ipo"]},
              "training.learning_rate": {"grid": [1e-4, 1e-3]}, "loss.beta": {"loguniform": [0.01, 0.5]},
              "training.epochs": {"randint": [1, 3]}, "training.warmup_ratio": {"uniform": [0.0, 0.2]},
              "seed": 5}
    ps = to_tune_param_space(space(search))
    assert ps["partition_order"].categories == [["easy", "hard"], ["hard", "easy"]]
    assert isinstance(ps["loss.type"], tune.search.sample.Categorical)
    assert ps["training.learning_rate"] == {"grid_search": [1e-4, 1e-3]}
    beta = ps["loss.beta"]
    assert isinstance(beta, tune.search.sample.Float) and (beta.lower, beta.upper) == (0.01, 0.5)
    assert isinstance(beta.get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(ps["training.epochs"], tune.search.sample.Integer) and ps["training.epochs"].upper == 3
    assert ps["seed"] == 5
    grid = to_tune_param_space(space({"loss.type": {"choice": ["sigmoid", "ipo"]}}, searcher="grid"))
    assert grid == {"loss.type": {"grid_search": ["sigmoid", "ipo"]}}
    with pytest.raises(ConfigError, match="optuna_define_by_run"):
        to_tune_param_space(space({"loss.beta": 0.1}, searcher="optuna"))


class FakeOptunaTrial:
    """Records what a define-by-run function asks for and answers with the first/lowest value."""

    def __init__(self):
        self.calls, self.params = [], {}

    def suggest_categorical(self, name, choices):
        self.calls.append(("categorical", name, choices))
        self.params[name] = choices[-1]
        return choices[-1]

    def suggest_float(self, name, low, high, *, log=False):
        self.calls.append(("float", name, low, high, log))
        self.params[name] = low
        return low

    def suggest_int(self, name, low, high):
        self.calls.append(("int", name, low, high))
        self.params[name] = high
        return high


def test_optuna_define_by_run_encodes_orders_and_decodes_them():
    s = space({"partition_order": {"permutations": ["easy", "hard"]}, "loss.beta": {"loguniform": [0.01, 0.5]},
               "training.warmup_ratio": {"uniform": [0.0, 0.2]}, "training.epochs": {"randint": [1, 3]},
               "training.adam_betas": {"choice": [[0.9, 0.99], [0.9, 0.999]]}, "seed": 5}, searcher="optuna")
    trial = FakeOptunaTrial()
    assert optuna_define_by_run(s)(trial) == {"seed": 5}
    assert trial.calls == [
        ("categorical", "partition_order", ["easy,hard", "hard,easy"]),
        ("float", "loss.beta", 0.01, 0.5, True),
        ("float", "training.warmup_ratio", 0.0, 0.2, False),
        ("int", "training.epochs", 1, 2),  # randint excludes hi (Tune); optuna's high is inclusive
        ("categorical", "training.adam_betas", ["[0.9, 0.99]", "[0.9, 0.999]"]),
    ]
    config = trial.params | {"seed": 5}
    decoded = decode_config(s, config)
    assert decoded["partition_order"] == ["hard", "easy"] and decoded["training.adam_betas"] == [0.9, 0.999]
    assert decode_config(s, decoded) == decoded  # Tune's own configs pass through
    job = trial_job(s, config)
    assert job.partitioning.order == ["hard", "easy"] and job.training.adam_betas == (0.9, 0.999)
    assert job.name == trial_job(s, decoded).name  # the id is the decoded point's


# --------------------------------------------------------------------------------------------------
# Resources of concurrent trials
# --------------------------------------------------------------------------------------------------
def assert_fits(plan, cluster, *needs):
    """The shares add up to at most the cluster, and every trial's own plans (`sdpo run`'s) accept a share."""
    for key, total in cluster.items():
        used = plan.trial_cluster.get(key, 0.0) + (plan.driver_cpus if key == "CPU" else 0.0)
        assert plan.concurrent * used <= total + 1e-9, (key, plan)
    for n in needs:
        plan_resources(plan.trial_cluster, num_workers=n.num_workers, use_gpu=n.use_gpu, data_cpus=n.data_cpus,
                       resources_per_worker=n.resources_per_worker)
        plan_scoring(plan.trial_cluster, use_gpu=n.use_gpu, data_cpus=n.data_cpus, num_actors=n.num_actors,
                     num_gpus_per_actor=n.num_gpus_per_actor, num_cpus_per_actor=n.num_cpus_per_actor)


CPU1 = TrialNeeds(num_workers=1, use_gpu=False, data_cpus=1.0)


def test_four_cpus_one_worker_runs_one_trial_at_a_time():
    """0.1 driver + the larger of (1 worker + 1 for Ray Data) and (1 inference actor + 1 for Ray Data):
    2.1 CPUs; two trials would need 4.2."""
    plan = plan_trials({"CPU": 4.0}, CPU1)
    assert plan.concurrent == 1 and plan.trial_cluster == {"CPU": 3.9} and plan.driver_cpus == DRIVER_CPUS
    assert plan.per_trial == {"CPU": 2.1}
    assert_fits(plan, {"CPU": 4.0}, CPU1)
    assert plan_resources(plan.trial_cluster, num_workers=1, use_gpu=False, data_cpus=1.0).per_worker == {"CPU": 1.0}


def test_sixteen_cpus():
    plan = plan_trials({"CPU": 16.0}, CPU1)
    assert plan.concurrent == 7 and plan.trial_cluster == {"CPU": 2.18}
    assert_fits(plan, {"CPU": 16.0}, CPU1)
    two = TrialNeeds(num_workers=2, use_gpu=False, data_cpus=1.0, resources_per_worker={"CPU": 2.0})
    plan = plan_trials({"CPU": 16.0}, two)
    assert plan.concurrent == 3 and plan.per_trial == {"CPU": 5.1}  # 0.1 + 2 x 2 + 1
    assert_fits(plan, {"CPU": 16.0}, two)


def test_resources_per_worker_size_the_trials():
    """4 CPUs a worker: 0.1 + 2 x 4 + 1 = 9.1 CPUs a trial, 3 on 32 CPUs (not 7 trials that then all fail
    in plan_resources, as when the planner assumed 1 CPU a worker)."""
    needs = TrialNeeds(num_workers=2, use_gpu=False, data_cpus=1.0, resources_per_worker={"CPU": 4.0})
    plan = plan_trials({"CPU": 32.0}, needs)
    assert plan.concurrent == 3 and plan.per_trial == {"CPU": 9.1}
    assert_fits(plan, {"CPU": 32.0}, needs)
    with pytest.raises(PlanError, match=r"a trial needs 9\.1 CPUs .*2 worker\(s\)"):
        plan_trials({"CPU": 8.0}, needs)


def test_eight_gpus_two_workers_per_trial():
    """2 workers (2 GPUs) while a stage trains, the inference actors (as many as the share's GPUs) between
    stages: 2 GPUs a trial, 4 trials on 8 GPUs."""
    cluster = {"CPU": 32.0, "GPU": 8.0}
    needs = TrialNeeds(num_workers=2, use_gpu=True, data_cpus=1.0)
    plan = plan_trials(cluster, needs)
    assert plan.concurrent == 4 and plan.trial_cluster == {"CPU": 7.9, "GPU": 2.0}
    assert plan.per_trial == {"CPU": 3.1, "GPU": 2.0}
    assert_fits(plan, cluster, needs)
    four_actors = TrialNeeds(num_workers=2, use_gpu=True, data_cpus=1.0, num_actors=4)
    assert plan_trials(cluster, four_actors).concurrent == 2  # 4 inference actors x 1 GPU
    assert plan_trials(cluster, four_actors).trial_cluster["GPU"] == 4.0


def test_a_one_gpu_machine_runs_what_sdpo_run_runs():
    """1 worker on 1 GPU, the inference actor on that GPU between stages (or on none): `sdpo run` plans
    the two in turn, so must the trial planner."""
    cluster = {"CPU": 16.0, "GPU": 1.0}
    for needs in (TrialNeeds(1, True), TrialNeeds(1, True, num_gpus_per_actor=0), TrialNeeds(1, True, num_gpus_per_actor=0.5)):
        plan_resources(cluster, num_workers=1, use_gpu=True, data_cpus=1.0)  # what `sdpo run` accepts
        plan_scoring(cluster, use_gpu=True, data_cpus=1.0, num_gpus_per_actor=needs.num_gpus_per_actor)
        plan = plan_trials(cluster, needs)
        assert plan.concurrent == 1 and plan.trial_cluster["GPU"] == 1.0
        assert_fits(plan, cluster, needs)


def test_the_most_demanding_trial_sizes_the_share():
    """A space searching scaling.num_workers: every trial gets the share of the largest."""
    small, large = TrialNeeds(1, False), TrialNeeds(3, False)
    plan = plan_trials({"CPU": 16.0}, [small, large])
    assert plan.per_trial == {"CPU": 4.1} and plan.concurrent == 3
    assert_fits(plan, {"CPU": 16.0}, small, large)
    gpus = [TrialNeeds(1, True), TrialNeeds(2, True)]
    assert plan_trials({"CPU": 32.0, "GPU": 8.0}, gpus).trial_cluster["GPU"] == 2.0
    with pytest.raises(PlanError, match=r"a trial needs 2 GPUs \(2 for 2 worker\(s\)"):
        plan_trials({"CPU": 32.0, "GPU": 1.0}, gpus)


def test_resource_jobs_cover_the_searched_scaling_and_reference_keys():
    s = space({"loss.beta": {"choice": [0.1, 0.2]}}, set={"scaling.resources_per_worker": {"CPU": 4}})
    assert [TrialNeeds.of(j) for j in resource_jobs(s)] == [TrialNeeds(1, False, 1.0, {"CPU": 4.0})]
    s = space({"scaling.num_workers": {"choice": [1, 3]}, "reference.num_actors": {"randint": [1, 3]}})
    needs = {(n.num_workers, n.num_actors) for n in map(TrialNeeds.of, resource_jobs(s))}
    assert needs == {(1, 1), (1, 2), (3, 1), (3, 2)}


def test_an_autoscaling_cluster_is_planned_for_what_the_trials_ask():
    """scaling.autoscale: a head-only cluster (CPU 0) grows to max_concurrent_trials (default 1) trials."""
    needs = TrialNeeds(num_workers=4, use_gpu=True, data_cpus=1.0)
    with pytest.raises(PlanError, match="a trial needs"):
        plan_trials({"CPU": 0.0}, needs)
    view = autoscaled_trials({"CPU": 0.0}, needs)
    assert view == {"CPU": 5.1, "GPU": 4.0}
    plan = plan_trials(view, needs)
    assert plan.concurrent == 1 and plan.trial_cluster == {"CPU": 5.0, "GPU": 4.0}
    assert_fits(plan, view, needs)
    wide = autoscaled_trials({"CPU": 8.0, "GPU": 0.0}, [needs], max_concurrent=3)
    assert wide == pytest.approx({"CPU": 15.3, "GPU": 12.0}) and plan_trials(wide, needs, max_concurrent=3).concurrent == 3


def test_gpu_trials_are_also_limited_by_cpus():
    needs = TrialNeeds(num_workers=2, use_gpu=True, data_cpus=1.0, resources_per_worker={"CPU": 2.0})
    plan = plan_trials({"CPU": 8.0, "GPU": 8.0}, needs)
    assert plan.concurrent == 1  # 5.1 CPUs a trial
    assert_fits(plan, {"CPU": 8.0, "GPU": 8.0}, needs)


def test_an_infeasible_trial_is_refused_up_front():
    with pytest.raises(PlanError, match=re.escape("a trial needs 2 GPUs (2 for 2 worker(s) while a stage trains, "
                                                  "1 for the inference actor(s)); the cluster has 1")):
        plan_trials({"CPU": 16.0, "GPU": 1.0}, TrialNeeds(2, True))
    with pytest.raises(PlanError, match=re.escape("a trial needs 3 GPUs (1 for 1 worker(s) while a stage trains, "
                                                  "3 for the inference actor(s))")):
        plan_trials({"CPU": 16.0, "GPU": 1.0}, TrialNeeds(1, True, num_actors=3))
    with pytest.raises(PlanError, match=r"a trial needs 2\.1 CPUs .*the cluster has 2\b.*num_cpus"):
        plan_trials({"CPU": 2.0}, CPU1)
    with pytest.raises(PlanError, match="at least 1"):
        plan_trials({"CPU": 4.0}, CPU1, max_concurrent=0)


def test_max_concurrent_caps_and_widens_the_share():
    plan = plan_trials({"CPU": 16.0}, CPU1, max_concurrent=2)
    assert plan.concurrent == 2 and plan.trial_cluster == {"CPU": 7.9}
    assert plan_trials({"CPU": 16.0}, CPU1, max_concurrent=99).concurrent == 7


@pytest.mark.parametrize("cpus, workers, data, per, actor", itertools.product(
    [2.1, 4, 6, 7.5, 16, 64], [1, 2, 3], [0.5, 1.0, 2.0], [None, {"CPU": 0.5}, {"CPU": 3.0}], [None, 2.0]))
def test_every_feasible_cpu_plan_fits(cpus, workers, data, per, actor):
    needs = TrialNeeds(workers, False, data, per, num_cpus_per_actor=actor)
    try:
        plan = plan_trials({"CPU": float(cpus)}, needs)
    except PlanError as err:
        assert "a trial needs" in str(err) or "does not run" in str(err)
        return
    assert plan.concurrent >= 1
    assert_fits(plan, {"CPU": float(cpus)}, needs)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
M = "eval/reward_accuracy"


def trial(name, values, order=("easy", "hard"), pruned=False, status="TERMINATED", reused=0, **config):
    stages = [{"index": i, "partition": order[(i - 1) % len(order)], "reused": i <= reused,
               "metrics": {} if v is None else {M: v, "eval/loss": 0.5}} for i, v in enumerate(values, 1)]
    return {"trial": name, "config": {"partition_order": list(order)} | config, "stages": stages,
            "pruned": pruned, "status": status}


TRIALS = [
    trial("a", [0.5, 0.6], beta=0.1),
    trial("b", [0.7], order=("hard", "easy"), pruned=True, beta=0.2),
    trial("c", [0.4, float("nan")], beta=0.3, status="ERROR"),
    trial("d", [0.55, 0.8], reused=1, beta=0.05),
    trial("e", [], status="ERROR", beta=0.4),
]


def test_results_are_ranked_by_the_final_metric_with_missing_last():
    rows, md = results_table(TRIALS, M, "max")
    assert [r["trial"] for r in rows] == ["d", "b", "a", "c", "e"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    d, b = rows[0], rows[1]
    assert list(d) == ["rank", "trial", "order", "stages", "beta", "final", "best", f"{M}@1", f"{M}@2",
                       "reused", "pruned", "status"]
    assert (d["order"], d["stages"], d["final"], d["best"], d[f"{M}@1"], d["reused"]) == ("easy→hard", 2, 0.8, 0.8,
                                                                                          0.55, 1)
    assert (b["order"], b["stages"], b["final"], b[f"{M}@2"], b["pruned"]) == ("hard→easy", 1, 0.7, None, True)
    c = rows[3]
    assert c["final"] is None and c["best"] == 0.4 and c["status"] == "ERROR"
    assert rows[4]["stages"] == 0 and rows[4]["final"] is None
    assert md.startswith("Trials ranked by `eval/reward_accuracy`") and "| 1 | d | easy→hard | 2 | 0.05 | 0.8 |" in md
    assert "| – |" in md


def test_min_mode_and_best():
    rows, _ = results_table(TRIALS, M, "min")
    assert [r["trial"] for r in rows] == ["a", "b", "d", "c", "e"]
    assert rows[0]["best"] == 0.5
    with pytest.raises(ValueError, match="max or min"):
        results_table(TRIALS, M, "maximum")


def test_order_label_falls_back_to_the_stage_partitions():
    t = trial("x", [0.1, 0.2], order=("p1", "p2"))
    del t["config"]["partition_order"]
    assert order_label(t) == "p1→p2"
    assert order_label({"config": {"partition_order": "hard,easy"}}) == "hard→easy"


def test_write_results(tmp_path):
    rows, md = results_table(TRIALS, M, "max")
    csv_path, md_path = write_results(str(tmp_path / "out"), rows, md)
    assert Path(md_path).read_text() == md
    back = list(csv.DictReader(io.StringIO(Path(csv_path).read_text())))
    assert [r["trial"] for r in back] == ["d", "b", "a", "c", "e"]
    assert back[0]["final"] == "0.8" and back[3]["final"] == "" and back[1]["pruned"] == "true"
    _, md2 = write_results(str(tmp_path / "out2"), rows)
    assert Path(md2).read_text() == rows_markdown(rows)
    assert rows_markdown([]) == "(no trials)\n"


def test_plot_metric_writes_a_png(tmp_path):
    path = plot_metric(str(tmp_path / "plots" / "metric.png"), TRIALS, M)
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    empty = Path(plot_metric(str(tmp_path / "empty.png"), [], M)).read_bytes()
    assert empty[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuning_imports_without_ray():
    code = "import sys, sdpo.tuning, sdpo.tune_results; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
