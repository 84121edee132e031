"""Planning before compute: the stage chain (plan_stages) and the Ray resources (plan_resources)."""

import copy
import itertools
import math

import pytest

from sdpo.config import parse_job
from sdpo.plan import (
    BASE,
    PlanError,
    ScoringPlan,
    format_plan,
    plan_resources,
    plan_scoring,
    plan_stages,
    steps_per_epoch,
    train_run_name,
    train_run_prefix,
    training_layout,
)

MINIMAL = {
    "model": {"path": "m"},
    "data": {"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"},
                         {"name": "c", "path": "c.jsonl"}]},
}
NAMES, SIZES = ["a", "b", "c"], [120, 80, 37]


def job(**sections):
    raw = copy.deepcopy(MINIMAL)
    raw.update(sections)
    return parse_job(raw)


# --------------------------------------------------------------------------------------------------
# Stage chain
# --------------------------------------------------------------------------------------------------
def test_stage_chain_references_and_inits():
    """sDPO: stage 1 starts from and is judged against the base model; stage t against M_{t-1}."""
    stages = plan_stages(job(), NAMES, SIZES)
    assert [s.index for s in stages] == [1, 2, 3]
    assert [s.partition for s in stages] == NAMES
    assert [s.num_pairs for s in stages] == SIZES
    assert [s.reference for s in stages] == [BASE, "stage 1", "stage 2"]
    assert [s.init for s in stages] == [BASE, "stage 1", "stage 2"]
    assert BASE == "base"


def test_init_base_keeps_base_for_every_stage():
    """init: base (ablation) changes the init only; the reference chain is still the previous stage."""
    stages = plan_stages(job(init="base"), NAMES, SIZES)
    assert [s.init for s in stages] == [BASE] * 3
    assert [s.reference for s in stages] == [BASE, "stage 1", "stage 2"]


def test_stages_inherit_job_values_without_overrides():
    j = job(loss={"beta": 0.3}, training={"learning_rate": 2e-6, "epochs": 4})
    for s in plan_stages(j, NAMES, SIZES):
        assert (s.beta, s.learning_rate, s.epochs) == (0.3, 2e-6, 4)


def test_per_stage_overrides_apply_to_their_stage_only():
    j = job(
        loss={"beta": 0.3}, training={"learning_rate": 2e-6, "epochs": 4},
        stages=[{"beta": 0.05}, {}, {"learning_rate": 1e-7, "epochs": 2}],
    )
    s1, s2, s3 = plan_stages(j, NAMES, SIZES)
    assert (s1.beta, s1.learning_rate, s1.epochs) == (0.05, 2e-6, 4)
    assert (s2.beta, s2.learning_rate, s2.epochs) == (0.3, 2e-6, 4)
    assert (s3.beta, s3.learning_rate, s3.epochs) == (0.3, 1e-7, 2)
    assert s3.total_steps == 2 * s3.steps_per_epoch
    assert s1.to_dict()["total_steps"] == 4 * s1.steps_per_epoch


@pytest.mark.parametrize("entries", [1, 2, 4])
def test_wrong_number_of_overrides(entries):
    j = job(stages=[{}] * entries)
    with pytest.raises(PlanError) as info:
        plan_stages(j, NAMES, SIZES)
    assert f"{entries} override entries for 3 partitions" in str(info.value)
    assert "one entry per stage" in str(info.value)


def test_empty_partition_is_refused():
    with pytest.raises(PlanError) as info:
        plan_stages(job(), NAMES, [120, 0, 37])
    assert "partition 'b' (stage 2) has no training pairs" in str(info.value)


@pytest.mark.parametrize("pairs, workers, batch, accum, expected", [
    (37, 2, 4, 2, 3),  # ceil(37/2)=19 rows/worker, ceil(19/4)=5 micro-steps, ceil(5/2)=3 steps
    (32, 2, 4, 2, 2),  # 16 rows/worker, 4 micro-steps, 2 steps
    (33, 2, 4, 2, 3),  # 17 rows/worker, 5 micro-steps, 3 steps
    (1, 8, 8, 4, 1),  # a single pair still makes one step
    (100, 1, 8, 1, 13),
    (1000, 4, 16, 1, 16),  # 250 rows/worker, ceil(250/16)=16
])
def test_steps_per_epoch_arithmetic(pairs, workers, batch, accum, expected):
    assert steps_per_epoch(pairs, workers, batch, accum) == expected


def test_plan_stages_uses_scaling_and_training_for_steps():
    j = job(scaling={"num_workers": 2}, training={"batch_size": 4, "gradient_accumulation_steps": 2})
    stages = plan_stages(j, ["x"], [37])
    assert stages[0].steps_per_epoch == 3


def test_train_run_names_carry_the_stage_and_its_inputs():
    """A stage's Ray Train run is named by its index and the digest of its inputs: other inputs, another
    run (whose checkpoints are never resumed); every stage's name starts with its own prefix only."""
    a = train_run_name("sdpo", 1, "0123456789abcdef")
    assert a == train_run_name("sdpo", 1, "0123456789abcdef") == "sdpo-stage1-0123456789"
    assert train_run_name("sdpo", 1, "fedcba9876543210") != a
    assert train_run_name("sdpo", 0, "0123456789abcdef") == "sdpo-probe-0123456789"
    names = [train_run_name("sdpo", i, "k" * 32) for i in (1, 2, 10, 11)]
    for i, name in zip((1, 2, 10, 11), names, strict=True):
        assert [n for n in names if n.startswith(train_run_prefix("sdpo", i))] == [name]


def test_format_plan_lists_every_stage():
    stages = plan_stages(job(stages=[{"beta": 0.05}, {}, {}]), NAMES, SIZES)
    text = format_plan(stages, eval_pairs=42)
    lines = text.splitlines()
    assert len(lines) == 1 + 3 + 1
    assert lines[1].split()[:4] == ["1", "a", "120", "base"]
    assert "stage 2" in lines[3]
    assert lines[-1] == "held-out pairs: 42"


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------
def test_cpu_share_split_among_workers():
    """2 CPUs, 1 kept for Ray Data, 2 workers -> half a CPU each."""
    plan = plan_resources({"CPU": 2}, num_workers=2, use_gpu=False, data_cpus=1)
    assert plan.per_worker == {"CPU": 0.5}
    assert plan.torch_threads == 1
    assert plan.data_cpus == 1


def test_cpu_share_capped_at_one():
    """4 CPUs, 1 for Ray Data, 2 workers -> 1.5 available each, capped at 1."""
    plan = plan_resources({"CPU": 4}, num_workers=2, use_gpu=False, data_cpus=1)
    assert plan.per_worker == {"CPU": 1.0}


def test_gpu_default_is_one_gpu_one_cpu_per_worker():
    plan = plan_resources({"CPU": 8, "GPU": 4}, num_workers=4, use_gpu=True, data_cpus=1)
    assert plan.per_worker == {"CPU": 1.0, "GPU": 1.0}


def test_explicit_resources_are_kept_and_get_a_gpu_when_asked():
    plan = plan_resources({"CPU": 16, "GPU": 2}, num_workers=2, use_gpu=True, data_cpus=2,
                          resources_per_worker={"CPU": 4})
    assert plan.per_worker == {"CPU": 4, "GPU": 1.0}
    assert plan.torch_threads == 4
    plan = plan_resources({"CPU": 16}, num_workers=2, use_gpu=False, data_cpus=2,
                          resources_per_worker={"CPU": 3})
    assert plan.per_worker == {"CPU": 3}


def test_default_cpu_plan_never_takes_the_data_reserve():
    """Over a grid of clusters: whenever a CPU plan is returned, workers + Ray Data fit in the cluster
    and each worker gets min(1, its share); the plan is refused (PlanError) only when nothing is left."""
    grid = itertools.product([0, 0.5, 1, 1.5, 2, 3, 4, 7, 16, 64], [1, 2, 3, 5, 8, 32], [0, 0.5, 1, 2, 4])
    planned = refused = 0
    for cpus, workers, data_cpus in grid:
        case = f"cpus={cpus} workers={workers} data_cpus={data_cpus}"
        try:
            plan = plan_resources({"CPU": cpus}, num_workers=workers, use_gpu=False, data_cpus=data_cpus)
        except PlanError as err:
            assert cpus <= data_cpus, case
            assert "scaling.data_cpus" in str(err), case
            refused += 1
            continue
        per = plan.per_worker["CPU"]
        assert 0 < per <= 1, case
        assert per * workers + data_cpus <= cpus + 1e-9, case
        assert per == pytest.approx(min(1.0, (cpus - data_cpus) / workers)), case
        planned += 1
    assert planned > 100 and refused > 10  # the grid exercises both outcomes


@pytest.mark.parametrize("cluster, kwargs, keys", [
    ({"CPU": 8, "GPU": 1}, dict(num_workers=2, use_gpu=True), ["scaling.num_workers", "scaling.use_gpu"]),
    ({"CPU": 8}, dict(num_workers=1, use_gpu=True), ["scaling.num_workers", "scaling.use_gpu"]),
    ({"CPU": 8, "GPU": 2}, dict(num_workers=2, use_gpu=True, resources_per_worker={"GPU": 2}),
     ["scaling.num_workers"]),
    ({"CPU": 4}, dict(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 2}),
     ["scaling.resources_per_worker.CPU"]),
    ({"CPU": 2, "GPU": 2}, dict(num_workers=2, use_gpu=True), ["scaling.resources_per_worker.CPU"]),
    ({"CPU": 1}, dict(num_workers=1, use_gpu=False), ["scaling.data_cpus", "scaling.num_workers"]),
    ({}, dict(num_workers=1, use_gpu=False, data_cpus=0), ["scaling.data_cpus"]),
])
def test_infeasible_requests_name_the_key_to_change(cluster, kwargs, keys):
    kwargs.setdefault("data_cpus", 1)
    with pytest.raises(PlanError) as info:
        plan_resources(cluster, **kwargs)
    for key in keys:
        assert key in str(info.value)


def test_explicit_request_that_just_fits_is_accepted():
    plan = plan_resources({"CPU": 5}, num_workers=2, use_gpu=False, data_cpus=1,
                          resources_per_worker={"CPU": 2})
    assert plan.per_worker["CPU"] * 2 + plan.data_cpus == 5
    assert math.isclose(plan.per_worker["CPU"], 2)


# --------------------------------------------------------------------------------------------------
# Scoring actors (reference, base-model and held-out passes)
# --------------------------------------------------------------------------------------------------
def test_scoring_cpu_one_actor_takes_all_but_the_data_cpu():
    """4 CPUs, data_cpus=1 kept for Ray Data -> one actor with 4 - 1 = 3 CPUs, 3 threads, fp32."""
    plan = plan_scoring({"CPU": 4}, use_gpu=False, data_cpus=1)
    assert plan == ScoringPlan(actors=1, num_cpus=3.0, num_gpus=0.0, threads=3, precision="fp32")


def test_scoring_cpu_two_cpus():
    """2 CPUs - 1 for Ray Data -> one actor with 1 CPU, 1 thread."""
    plan = plan_scoring({"CPU": 2}, use_gpu=False, data_cpus=1)
    assert plan == ScoringPlan(actors=1, num_cpus=1.0, num_gpus=0.0, threads=1, precision="fp32")


@pytest.mark.parametrize("cpus, data_cpus, expected", [
    (4, 0, 3.0),  # Ray Data always keeps at least one CPU: 4 - max(0, 1) = 3, not 4
    (4, 0.5, 3.0),  # 4 - max(0.5, 1) = 3
    (8, 2, 6.0),  # 8 - 2 = 6
    (1.5, 1, 0.5),  # 1.5 - 1 = 0.5, the smallest share an actor is given
])
def test_scoring_cpu_share_keeps_at_least_one_cpu_for_ray_data(cpus, data_cpus, expected):
    plan = plan_scoring({"CPU": cpus}, use_gpu=False, data_cpus=data_cpus)
    assert (plan.actors, plan.num_cpus) == (1, expected)
    assert plan.threads == max(1, int(expected))


def test_scoring_cpu_several_actors_split_the_share():
    """8 CPUs - 1 for Ray Data = 7, over 2 actors -> 3.5 CPUs each, int(3.5) = 3 threads."""
    plan = plan_scoring({"CPU": 8}, use_gpu=False, data_cpus=1, num_actors=2)
    assert (plan.actors, plan.num_cpus, plan.threads) == (2, 3.5, 3)


def test_scoring_cpu_explicit_cpus_per_actor():
    """3 actors x 2 CPUs + 1 for Ray Data = 7 <= 8."""
    plan = plan_scoring({"CPU": 8}, use_gpu=False, data_cpus=1, num_actors=3, num_cpus_per_actor=2)
    assert (plan.actors, plan.num_cpus, plan.num_gpus, plan.threads) == (3, 2, 0.0, 2)


def test_scoring_gpu_one_actor_per_gpu():
    """16 CPUs, 4 GPUs -> 4 actors x (1 GPU, 1 CPU), bf16; 4 CPUs + 1 for Ray Data <= 16."""
    plan = plan_scoring({"CPU": 16, "GPU": 4}, use_gpu=True, data_cpus=1)
    assert plan == ScoringPlan(actors=4, num_cpus=1.0, num_gpus=1.0, threads=1, precision="autocast")


def test_scoring_gpu_explicit_actor_count():
    plan = plan_scoring({"CPU": 16, "GPU": 4}, use_gpu=True, data_cpus=1, num_actors=2)
    assert (plan.actors, plan.num_gpus, plan.num_cpus, plan.precision) == (2, 1.0, 1.0, "autocast")


def test_scoring_gpu_fractional_and_multi_gpu_actors():
    """0.5 GPU each on 2 GPUs -> 2 // 0.5 = 4 actors; 2 GPUs each on 3 GPUs -> 3 // 2 = 1 actor."""
    half = plan_scoring({"CPU": 16, "GPU": 2}, use_gpu=True, data_cpus=1, num_gpus_per_actor=0.5)
    assert (half.actors, half.num_gpus) == (4, 0.5)
    double = plan_scoring({"CPU": 16, "GPU": 3}, use_gpu=True, data_cpus=1, num_gpus_per_actor=2)
    assert (double.actors, double.num_gpus) == (1, 2)


def test_scoring_without_use_gpu_stays_on_cpu_on_a_gpu_cluster():
    plan = plan_scoring({"CPU": 4, "GPU": 2}, use_gpu=False, data_cpus=1)
    assert (plan.actors, plan.num_gpus, plan.num_cpus, plan.precision) == (1, 0.0, 3.0, "fp32")


@pytest.mark.parametrize("cluster, kwargs", [
    ({"CPU": 16, "GPU": 4}, dict(num_actors=5)),  # 5 x 1 GPU > 4
    ({"CPU": 16, "GPU": 4}, dict(num_actors=3, num_gpus_per_actor=2)),  # 3 x 2 = 6 > 4
    ({"CPU": 16}, dict()),  # use_gpu on a cluster without GPUs: 1 actor x 1 GPU > 0
])
def test_scoring_too_many_gpus_names_the_key(cluster, kwargs):
    with pytest.raises(PlanError) as info:
        plan_scoring(cluster, use_gpu=True, data_cpus=1, **kwargs)
    assert "reference.num_actors" in str(info.value)
    assert "GPU" in str(info.value)


@pytest.mark.parametrize("cluster, kwargs", [
    ({"CPU": 1}, dict(use_gpu=False)),  # share max(0.5, 1 - 1) = 0.5, + 1 kept = 1.5 > 1
    ({"CPU": 4}, dict(use_gpu=False, num_actors=4, num_cpus_per_actor=1)),  # 4 + 1 = 5 > 4
    ({"CPU": 2}, dict(use_gpu=False, num_actors=3)),  # max(0.5, 1/3) = 0.5 each: 1.5 + 1 = 2.5 > 2
    ({"CPU": 4, "GPU": 4}, dict(use_gpu=True)),  # 4 actors x 1 CPU + 1 kept = 5 > 4
    ({}, dict(use_gpu=False)),
])
def test_scoring_refuses_to_leave_ray_data_no_cpu(cluster, kwargs):
    with pytest.raises(PlanError) as info:
        plan_scoring(cluster, data_cpus=1, **kwargs)
    assert "Ray Data" in str(info.value)
    assert "reference.num_actors" in str(info.value)


@pytest.mark.parametrize("use_gpu", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_scoring_explicit_precision_passes_through(use_gpu, precision):
    plan = plan_scoring({"CPU": 16, "GPU": 2}, use_gpu=use_gpu, data_cpus=1, precision=precision)
    assert plan.precision == precision


def test_scoring_plans_always_fit_the_cluster():
    """Over a grid: a returned plan never asks for more than the cluster has once Ray Data keeps
    max(data_cpus, 1) CPUs; a refusal is a PlanError naming reference.num_actors."""
    grid = itertools.product([0, 1, 1.5, 2, 4, 7, 16], [0, 1, 2, 8], [0, 0.5, 1, 3], [None, 1, 2, 5], [False, True])
    planned = refused = 0
    for cpus, gpus, data_cpus, actors, use_gpu in grid:
        case = f"cpus={cpus} gpus={gpus} data_cpus={data_cpus} actors={actors} use_gpu={use_gpu}"
        try:
            plan = plan_scoring({"CPU": cpus, "GPU": gpus}, use_gpu=use_gpu, data_cpus=data_cpus, num_actors=actors)
        except PlanError as err:
            assert "reference.num_actors" in str(err), case
            refused += 1
            continue
        assert plan.actors >= 1, case
        assert plan.actors * plan.num_cpus + max(data_cpus, 1) <= cpus + 1e-9, case
        assert plan.actors * plan.num_gpus <= gpus + 1e-9, case
        assert (plan.num_gpus > 0) == use_gpu, case
        assert plan.precision == ("autocast" if use_gpu else "fp32"), case
        assert plan.threads == max(1, int(plan.num_cpus)), case
        planned += 1
    assert planned > 50 and refused > 50


def test_cpu_actor_fits_on_one_node_of_a_multi_node_cluster():
    """Two 2-CPU nodes sum to 4 CPUs, but no actor can hold 3 of them: asking would wait forever (found on
    the 2-node loopback cluster). The actor takes the largest node's CPUs instead."""
    assert plan_scoring({"CPU": 4}, use_gpu=False, data_cpus=1).num_cpus == 3  # one node of 4
    plan = plan_scoring({"CPU": 4}, use_gpu=False, data_cpus=1, node_cpus=2)
    assert plan.num_cpus == 2 and plan.threads == 2
    with pytest.raises(PlanError, match="largest node has 2"):
        plan_scoring({"CPU": 8}, use_gpu=False, data_cpus=1, num_cpus_per_actor=3, node_cpus=2)


@pytest.mark.parametrize("use_gpu, training, asked, expected", [
    (False, "auto", "auto", "fp32"),  # CPU training is fp32
    (True, "auto", "auto", "autocast"),  # GPU training is bf16 autocast on fp32 weights: so is the pass
    (False, "bf16", "auto", "autocast"),  # bf16 training on CPU: autocast too
    (True, "fp32", "auto", "fp32"),
    (True, "auto", "bf16", "bf16"),  # asked for: bf16 weights
    (False, "bf16", "fp32", "fp32"),
])
def test_scoring_precision_follows_training(use_gpu, training, asked, expected):
    cluster = {"CPU": 8, "GPU": 1} if use_gpu else {"CPU": 8}
    plan = plan_scoring(cluster, use_gpu=use_gpu, data_cpus=1, precision=asked, training_precision=training)
    assert plan.precision == expected


@pytest.mark.parametrize("shared, prefix, checkpointing, layout", [
    (True, True, False, "prefix"), (True, True, True, "shared"), (True, False, False, "shared"),
    (False, True, False, "plain"),
])
def test_training_layout(shared, prefix, checkpointing, layout):
    assert training_layout(shared_prompt=shared, prefix_cache=prefix, gradient_checkpointing=checkpointing) == layout
