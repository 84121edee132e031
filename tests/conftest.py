"""Shared fixtures. Ray tests share one local Ray session per module (`ray_session`)."""

import os
from pathlib import Path

import pytest

# Same behaviour on every machine: no token auth, no uv env replication, quiet Ray Data.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
ORCA = SHARED / "data" / "orca_dpo_pairs.jsonl"
ULTRAFEEDBACK = SHARED / "data" / "ultrafeedback_binarized_1k.jsonl"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not STORIES.is_dir():
        pytest.fail(f"the shared test assets are missing at {SHARED}; tests need ../shared beside the checkout")
    return SHARED


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole test module (2 cores: 4 logical CPUs, a small object store)."""
    import ray
    from ray.data import DataContext

    from sdpo.pipeline import local_ray_options

    ray.init(num_cpus=4, include_dashboard=False, **local_ray_options(4), object_store_memory=300 * 1024 * 1024,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=True)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 on a free loopback port for the whole session, with AWS_ENDPOINT_URL, test credentials
    and us-east-1 set in `os.environ` (AWS_PROFILE unset), so that Ray started afterwards inherits them.
    Yields a `tests.s3server.S3Server` (`.endpoint`, `.make_bucket(name) -> "s3://name"`, `.stop()`)."""
    from .s3server import running_s3_server

    with running_s3_server(str(tmp_path_factory.mktemp("aws"))) as server:
        yield server
