"""What a cluster's node types offer, and whether a job's requests fit them. Pure Python, no Ray.

An autoscaling cluster starts with little or nothing up; a job whose workers ask for a bundle no
node type provides (9 GPUs on one worker, 16 CPUs beside a GPU on a 8-CPU node) would wait forever
for a node the autoscaler can never add. `placement_problem` says so before submission, for the
cluster launcher's `cluster.yaml` and for a KubeRay `RayJob`/`RayCluster` manifest alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdpo.config import JobConfig


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # what one node offers Ray: CPU, GPU, custom resources
    max_workers: int


def launcher_node_types(config: dict[str, Any]) -> list[NodeType]:
    """Worker node types of a cluster-launcher config (`available_node_types`, less the head's)."""
    head = config.get("head_node_type")
    return [NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()}, int(spec.get("max_workers", 0)))
            for name, spec in config.get("available_node_types", {}).items() if name != head]


def _quantity(value: Any) -> float:
    """A Kubernetes quantity as a number: '8' -> 8, '500m' -> 0.5."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_node_types(manifest: dict[str, Any]) -> list[NodeType]:
    """Worker groups of a KubeRay RayJob (spec.rayClusterSpec) or RayCluster (spec), as node types:
    a pod offers its Ray container's CPU and nvidia.com/gpu limits, unless rayStartParams override them."""
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    types = []
    for group in spec.get("workerGroupSpecs", []):
        container = group["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        params = group.get("rayStartParams", {})
        resources = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0)))}
        gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
        if _quantity(gpus):
            resources["GPU"] = _quantity(gpus)
        types.append(NodeType(group["groupName"], resources, int(group.get("maxReplicas", 0))))
    return types


def job_bundles(job: JobConfig) -> list[tuple[str, dict[str, float], int]]:
    """(what, bundle, how many) a job asks the cluster for at once: its training workers, and the
    inference passes' actors (which run between stages, never beside training)."""
    s, r = job.scaling, job.reference
    worker = dict(s.resources_per_worker or {"CPU": 1.0})
    worker.setdefault("CPU", 1.0)
    if s.use_gpu:
        worker.setdefault("GPU", 1.0)
    bundles = [("training worker", worker, s.num_workers)]
    gpu_each = r.num_gpus_per_actor if r.num_gpus_per_actor is not None else (1.0 if s.use_gpu else 0.0)
    if gpu_each > 0:
        actor = {"CPU": r.num_cpus_per_actor or 1.0, "GPU": gpu_each}
        bundles.append(("inference actor", actor, r.num_actors or s.num_workers))
    return bundles


def _per_node(bundle: dict[str, float], offer: dict[str, float]) -> int:
    """How many copies of `bundle` one node offering `offer` holds."""
    fits = [math.floor(offer.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(fits) if fits else 0


def placement_problem(job: JobConfig, node_types: list[NodeType]) -> str | None:
    """Why the cluster can never run this job's requests at once, or None when it can."""
    described = "; ".join(f"{t.name} {t.resources} x{t.max_workers}" for t in node_types) or "none"
    if job.scaling.use_gpu and not any(t.resources.get("GPU", 0) > 0 for t in node_types):
        return f"{job.name}: scaling.use_gpu is set but no worker node type has a GPU (node types: {described})"
    for what, bundle, count in job_bundles(job):
        capacity = sum(_per_node(bundle, t.resources) * t.max_workers for t in node_types)
        if not any(_per_node(bundle, t.resources) for t in node_types):
            return (f"{job.name}: each {what} asks for {bundle}, which no worker node type offers "
                    f"(node types: {described}); lower scaling.resources_per_worker or add a node type")
        if capacity < count:
            return (f"{job.name}: {count} {what}s of {bundle} need more than the cluster can grow to "
                    f"({capacity} at most; node types: {described}); raise max_workers or lower the count")
    return None
