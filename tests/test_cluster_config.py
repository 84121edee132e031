"""cluster.yaml and the KubeRay manifest, checked offline: Ray's own validator, their structure, and that
every shipped job asks for resources some node type provides (else an autoscaler would wait forever)."""

from pathlib import Path

import pytest
import yaml

from sdpo.cluster import NodeType, job_bundles, kuberay_node_types, launcher_node_types, placement_problem
from sdpo.config import load_job, parse_job
from sdpo.plan import autoscaled_view, plan_resources, plan_scoring

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load(RAYJOB.read_text())


def test_cluster_yaml_passes_rays_validator(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))  # raises on a schema error


def test_ray_validator_catches_what_it_should(launcher):
    """The check above can fail: a broken copy of the file is rejected."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    def broken(change):
        config = yaml.safe_load(CLUSTER.read_text())
        change(config)
        return prepare_config(config)

    with pytest.raises(ValueError, match="max_workers"):  # more nodes kept up than the cluster may have
        validate_config(broken(lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=20)))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(broken(lambda c: c.update(head_node_type="nope")))
    with pytest.raises(jsonschema.ValidationError, match="node_kind"):  # not a key of the schema
        validate_config(broken(lambda c: c["available_node_types"]["gpu_1x"].update(node_kind="gpu")))
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate_config(broken(lambda c: c["available_node_types"]["gpu_1x"].pop("resources")))


def test_head_schedules_no_work_and_gpu_nodes_scale_from_zero(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu_types = launcher_node_types(launcher)
    gpus = {t.name: t.resources.get("GPU", 0) for t in gpu_types}
    assert gpus["gpu_1x"] == 1 and gpus["gpu_8x"] == 8
    for name in ("gpu_1x", "gpu_8x", "gpu_8x_spot"):
        spec = launcher["available_node_types"][name]
        assert spec["min_workers"] == 0 < spec["max_workers"] <= launcher["max_workers"]
    spot = launcher["available_node_types"]["gpu_8x_spot"]["node_config"]
    assert spot["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert launcher["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("/home/ray/sdpo" in c for c in launcher["setup_commands"])


def test_cluster_yaml_opens_with_its_command():
    first = CLUSTER.read_text().splitlines()[0]
    assert first.startswith("# ray up cluster.yaml")
    # `ray dashboard` holds its tunnel in the foreground: `&&` would never reach the submit
    assert "ray dashboard cluster.yaml &" in first and "ray dashboard cluster.yaml &&" not in first.replace(" ", "")


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_fits_a_node_type(path, launcher):
    assert placement_problem(load_job(path), launcher_node_types(launcher)) is None


def _job(**scaling):
    return parse_job({"name": "j", "model": {"path": "m"}, "data": {"sources": [{"name": "a", "path": "a.jsonl"}]},
                      "scaling": scaling})


def test_placement_problem_names_what_cannot_fit():
    types = [NodeType("gpu_1x", {"CPU": 8, "GPU": 1}, 2), NodeType("cpu", {"CPU": 16}, 4)]
    assert placement_problem(_job(num_workers=2, use_gpu=True), types) is None
    too_many = placement_problem(_job(num_workers=3, use_gpu=True), types)
    assert "3 training workers" in too_many and "2 at most" in too_many and "max_workers" in too_many
    too_big = placement_problem(_job(num_workers=1, use_gpu=True, resources_per_worker={"CPU": 12, "GPU": 1}), types)
    assert "{'CPU': 12.0, 'GPU': 1.0}" in too_big and "no worker node type" in too_big
    no_gpu = placement_problem(_job(use_gpu=True), [NodeType("cpu", {"CPU": 16}, 4)])
    assert "no worker node type has a GPU" in no_gpu
    assert placement_problem(_job(num_workers=4), types) is None  # CPU training fits anywhere


def test_job_bundles_include_the_inference_actors():
    bundles = job_bundles(_job(num_workers=4, use_gpu=True))
    assert bundles == [("training worker", {"CPU": 1.0, "GPU": 1.0}, 4), ("inference actor", {"CPU": 1.0, "GPU": 1.0}, 4)]
    assert len(job_bundles(_job(num_workers=2))) == 1  # CPU inference shares the training nodes' CPUs


def test_kuberay_rayjob_structure(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-1x"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"] == \
            cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_kuberay_job_runs_a_shipped_job_that_fits_its_worker_groups(rayjob):
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:2] == ["sdpo", "run"] and entry[2].startswith("/home/ray/sdpo/jobs/")
    job = load_job(ROOT / "jobs" / Path(entry[2]).name)
    assert "--output" in entry and entry[entry.index("--output") + 1].startswith("s3://")
    types = kuberay_node_types(rayjob)
    assert {t.name: t.resources for t in types}["gpu-1x"] == {"CPU": 8.0, "GPU": 1.0}
    assert placement_problem(job, types) is None


def test_autoscaled_view_plans_a_gpu_job_on_a_head_only_cluster():
    """The head of an autoscaling cluster offers no CPU and no GPU; planning against it would refuse every
    job. With scaling.autoscale the plan is for what the job asks, and the autoscaler supplies it."""
    head_only = {"CPU": 0.0, "memory": 1e10}
    with pytest.raises(Exception, match="GPUs but the cluster has 0"):
        plan_resources(head_only, num_workers=4, use_gpu=True, data_cpus=4)
    view = autoscaled_view(head_only, num_workers=4, use_gpu=True, data_cpus=4, resources_per_worker={"CPU": 4, "GPU": 1})
    assert view["GPU"] == 4 and view["CPU"] == 20
    plan = plan_resources(view, num_workers=4, use_gpu=True, data_cpus=4, resources_per_worker={"CPU": 4, "GPU": 1})
    assert plan.per_worker == {"CPU": 4, "GPU": 1}
    scoring = plan_scoring(view, use_gpu=True, data_cpus=4)
    assert scoring.actors == 4 and scoring.num_gpus == 1
    bigger = {"CPU": 64.0, "GPU": 8.0}
    assert autoscaled_view(bigger, num_workers=2, use_gpu=True, data_cpus=1) == bigger  # never shrinks
