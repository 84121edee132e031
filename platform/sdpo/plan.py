"""Planning before compute: the stage chain and the Ray resources. Pure Python, no Ray.

The sDPO pipeline is data: a list of stages, each naming its partition, its reference and its init,
so it can be printed, hashed and checked before anything trains. Resources are planned the same way:
a pure function decides what each training worker asks for and refuses a plan that cannot run —
including one that would leave Ray Data no CPU, which hangs `fit()` forever.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sdpo.config import JobConfig

BASE = "base"


class PlanError(ValueError):
    """A plan that cannot run; the message names the setting to change."""


@dataclass(frozen=True)
class StagePlan:
    index: int  # 1-based
    partition: str
    num_pairs: int
    reference: str  # "base" or "stage <t-1>"
    init: str  # "base" or "stage <t-1>"
    beta: float
    learning_rate: float
    loss: str
    loss_options: dict
    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def to_dict(self) -> dict:
        return asdict(self) | {"total_steps": self.total_steps}


def steps_per_epoch(num_pairs: int, world_size: int, batch_size: int, accumulation: int) -> int:
    """Optimiser steps per epoch when the partition is padded to a multiple of the worker count."""
    rows_per_worker = math.ceil(num_pairs / world_size)
    return math.ceil(math.ceil(rows_per_worker / batch_size) / accumulation)


def train_run_name(job_name: str, index: int, key: str) -> str:
    """The name of stage `index`'s Ray Train run under `<output>/ray`. `key` is the digest of the stage's
    inputs (models, pairs, settings): an interrupted stage resumes from its checkpoints only when its
    inputs are the same, and a stage retrained with other inputs starts afresh rather than restoring a
    checkpoint of the old ones. Index 0 is the selection probe."""
    return f"{job_name}-{'probe' if index == 0 else f'stage{index}'}-{key[:10]}"


def train_run_prefix(job_name: str, index: int) -> str:
    return train_run_name(job_name, index, "")


def plan_stages(job: JobConfig, names: list[str], sizes: list[int]) -> list[StagePlan]:
    overrides = job.stages or []
    if overrides and len(overrides) != len(names):
        raise PlanError(
            f"stages: {len(overrides)} override entries for {len(names)} partitions {names}; "
            "give one entry per stage (use {} for no change)"
        )
    t = job.training
    plans = []
    for i, (name, n) in enumerate(zip(names, sizes, strict=True), start=1):
        if n == 0:
            raise PlanError(f"partition {name!r} (stage {i}) has no training pairs; check its source and the eval split")
        o = overrides[i - 1] if overrides else None
        loss = job.stage_loss(i - 1)
        prev = BASE if i == 1 else f"stage {i - 1}"
        epochs = (o and o.epochs) or t.epochs
        plans.append(StagePlan(
            index=i,
            partition=name,
            num_pairs=n,
            reference=prev,
            init=prev if job.init == "previous" else BASE,
            beta=loss.beta,
            loss=loss.type,
            loss_options=loss.options,
            learning_rate=(o and o.learning_rate) or t.learning_rate,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch(n, job.scaling.num_workers, t.batch_size, t.gradient_accumulation_steps),
        ))
    return plans


def format_plan(stages: list[StagePlan], eval_pairs: int) -> str:
    head = (f"{'stage':>5}  {'partition':<16} {'pairs':>7}  {'reference':<9}  {'init':<9}  {'loss':<10} {'beta':>6}  "
            f"{'lr':>8}  {'epochs':>6}  {'steps':>6}")
    rows = [
        f"{s.index:>5}  {s.partition:<16} {s.num_pairs:>7}  {s.reference:<9}  {s.init:<9}  {s.loss:<10} {s.beta:>6g}  "
        f"{s.learning_rate:>8.2g}  {s.epochs:>6}  {s.total_steps:>6}"
        for s in stages
    ]
    return "\n".join([head, *rows, f"held-out pairs: {eval_pairs}"])


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResourcePlan:
    per_worker: dict[str, float]
    torch_threads: int
    data_cpus: float


def plan_resources(
    cluster: dict[str, float],
    *,
    num_workers: int,
    use_gpu: bool,
    data_cpus: float,
    resources_per_worker: dict[str, float] | None = None,
) -> ResourcePlan:
    """What each training worker asks for, leaving `data_cpus` CPUs to Ray Data.

    Default on CPU: share the cluster's CPUs (less the data reserve) among the workers, at most 1
    each. On GPU: one GPU and one CPU per worker.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if resources_per_worker is not None:
        per = dict(resources_per_worker)
        if use_gpu:
            per.setdefault("GPU", 1.0)
    elif use_gpu:
        per = {"CPU": 1.0, "GPU": 1.0}
    else:
        share = (cpus - data_cpus) / num_workers
        if share <= 0:
            raise PlanError(
                f"scaling: the cluster has {cpus:g} CPUs and scaling.data_cpus={data_cpus:g} are kept for "
                f"Ray Data, which leaves none for scaling.num_workers={num_workers}; lower data_cpus or "
                "num_workers, or add nodes"
            )
        per = {"CPU": min(1.0, share)}
    need_cpu = per.get("CPU", 0.0) * num_workers
    need_gpu = per.get("GPU", 0.0) * num_workers
    if need_gpu > gpus:
        raise PlanError(
            f"scaling: {num_workers} workers x {per.get('GPU'):g} GPU need {need_gpu:g} GPUs but the cluster "
            f"has {gpus:g}; lower scaling.num_workers or set scaling.use_gpu=false"
        )
    if need_cpu + data_cpus > cpus + 1e-9:
        raise PlanError(
            f"scaling: workers ask for {need_cpu:g} CPUs and Ray Data keeps {data_cpus:g}, more than the "
            f"cluster's {cpus:g}; lower scaling.resources_per_worker.CPU, num_workers or data_cpus "
            "(a request that can never be met would otherwise wait forever)"
        )
    return ResourcePlan(per, max(1, int(per.get("CPU", 1.0))), data_cpus)


def autoscaled_view(cluster: dict[str, float], *, num_workers: int, use_gpu: bool, data_cpus: float,
                    resources_per_worker: dict[str, float] | None = None) -> dict[str, float]:
    """The cluster as the autoscaler will make it for this job: what is up now, raised to what the
    training workers (and Ray Data's reserve) ask for. An autoscaling cluster often starts with a head
    node alone, which offers no GPU and, by design, no CPU for work; planning against that would refuse
    every job. Ray queues the requests and the autoscaler adds the nodes."""
    per = dict(resources_per_worker or {"CPU": 1.0})
    per.setdefault("CPU", 1.0)
    if use_gpu:
        per.setdefault("GPU", 1.0)
    view = dict(cluster)
    for key, each in per.items():
        need = each * num_workers + (data_cpus if key == "CPU" else 0.0)
        view[key] = max(view.get(key, 0.0), need)
    return view


@dataclass(frozen=True)
class ScoringPlan:
    """The inference passes' actor pool (reference, base-model and held-out scoring)."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    precision: str  # resolved: "fp32", "autocast" (fp32 weights, bf16 autocast) or "bf16" (bf16 weights)


def training_layout(*, shared_prompt: bool, prefix_cache: bool, gradient_checkpointing: bool) -> str:
    """The pair layout a stage's worker trains with where the model supports it (`worker.stage_loop`):
    the inference passes score in the same one, so a precomputed reference is the policy's own at step 0."""
    if not shared_prompt:
        return "plain"
    return "prefix" if prefix_cache and not gradient_checkpointing else "shared"


def plan_scoring(
    cluster: dict[str, float],
    *,
    use_gpu: bool,
    data_cpus: float,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_actor: float | None = None,
    precision: str = "auto",
    training_precision: str = "auto",
    node_cpus: float | None = None,
) -> ScoringPlan:
    """Size the actor pool of the inference passes, which run between stages (never beside training).

    GPU: one actor per GPU, 1 GPU and 1 CPU each. CPU: one actor holding every CPU but Ray Data's
    share (one model copy, many threads, beats several copies fighting for the same cores), and no more
    than the largest node has (`node_cpus`): on a multi-node cluster the sum of the nodes' CPUs is not
    a place an actor can live — asking for it is a request that waits forever.

    Precision `auto` scores as training computes (`training_precision`, resolved as the workers resolve it:
    bf16 autocast on GPUs): the reference's log-probs are then the policy's own at step 0, so a stage's
    first loss is exactly ln 2. bf16 *weights* (`bf16`) round the residual stream where autocast keeps it
    in fp32, which would shift every pair's log-ratio by a fixed error for the whole stage.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpu_each = num_gpus_per_actor if num_gpus_per_actor is not None else (1.0 if use_gpu else 0.0)
    if gpu_each > 0:
        actors = num_actors or max(1, int(gpus // gpu_each))
        cpu_each = num_cpus_per_actor or 1.0
    else:
        actors = num_actors or 1
        cpu_each = num_cpus_per_actor or max(0.5, (cpus - max(data_cpus, 1.0)) / actors)
        if node_cpus is not None and not num_cpus_per_actor:
            cpu_each = min(cpu_each, node_cpus)  # an actor lives on one node: the cluster's sum is not a node
    if node_cpus is not None and cpu_each > node_cpus + 1e-9:
        raise PlanError(
            f"reference: an actor asks for {cpu_each:g} CPUs but the largest node has {node_cpus:g}; it would "
            "wait forever. Lower reference.num_cpus_per_actor"
        )
    if actors * gpu_each > gpus + 1e-9:
        raise PlanError(
            f"reference: {actors} actors x {gpu_each:g} GPU need {actors * gpu_each:g} GPUs but the cluster has "
            f"{gpus:g}; lower reference.num_actors or reference.num_gpus_per_actor"
        )
    keep = max(data_cpus, 1.0)  # Ray Data's read and write tasks need a CPU beside the actors, or the pass hangs
    if actors * cpu_each + keep > cpus + 1e-9:
        raise PlanError(
            f"reference: {actors} actors x {cpu_each:g} CPU, plus {keep:g} CPU kept for Ray Data, exceed the "
            f"cluster's {cpus:g} CPUs; lower reference.num_actors or reference.num_cpus_per_actor, or add nodes"
        )
    if precision == "auto":
        bf16_training = training_precision == "bf16" or (training_precision == "auto" and use_gpu)
        precision = "autocast" if bf16_training else "fp32"
    return ScoringPlan(actors, cpu_each, gpu_each, max(1, int(cpu_each)), precision)
