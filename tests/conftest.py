"""Shared fixtures: a real moto S3 server process on loopback, a real local Ray, tiny models."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

TESTS = str(Path(__file__).parent)
sys.path.insert(0, TESTS)  # tiny_models, helpers, plugin_rewards
# Ray's worker processes inherit this, so plug-ins named module:function import there too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)

# Keep every test on the CPU and quiet, whatever the machine has.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("PGRAFT_S3_MAX_ATTEMPTS", "2")
os.environ.setdefault("PGRAFT_S3_CONNECT_TIMEOUT", "2")

from cluster.local_s3 import TEST_CREDENTIALS, free_port, start_moto  # noqa: E402,F401 (tests import them from here)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server process on 127.0.0.1; its endpoint goes into the standard env vars,
    set before Ray starts so that Ray's workers inherit them."""
    os.environ.update(TEST_CREDENTIALS)
    proc, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_faults(s3_endpoint):
    """A fault proxy (cluster/fault_proxy.py) in front of the S3 server, passing everything
    until the test takes the store away; `.direct` is the server's own endpoint."""
    from cluster.fault_proxy import FaultProxy

    host, port = s3_endpoint.rsplit("//", 1)[1].split(":")
    with FaultProxy(host, int(port)) as proxy:
        proxy.direct = s3_endpoint
        yield proxy


@pytest.fixture
def s3_uri(s3_endpoint):
    """A fresh bucket on the moto server; returns s3://bucket/run."""
    import boto3

    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"


@pytest.fixture(scope="session")
def _ray_session_shutdown():
    import ray

    yield
    ray.shutdown()


def ensure_local_ray():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture
def ray_local(s3_endpoint, _ray_session_shutdown):
    """A real local Ray cluster with 2 CPUs, started once and kept for the session (restarted
    only if a test stopped it). Started after the S3 server so its workers see the endpoint."""
    return ensure_local_ray()


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    from tiny_models import save_tiny_digits

    return save_tiny_digits(tmp_path_factory.mktemp("models") / "digits-ddpm", "ddpm")


@pytest.fixture(scope="session")
def tiny_digits_flow(tmp_path_factory):
    from tiny_models import save_tiny_digits

    return save_tiny_digits(tmp_path_factory.mktemp("models") / "digits-flow", "flow")


@pytest.fixture(scope="session")
def tiny_sd_factory(tmp_path_factory):
    from tiny_models import save_tiny_sd

    cache: dict[str, Path] = {}

    def make(prediction_type: str = "epsilon") -> Path:
        if prediction_type not in cache:
            cache[prediction_type] = save_tiny_sd(tmp_path_factory.mktemp("models") / f"sd-{prediction_type}", prediction_type)
        return cache[prediction_type]

    return make


@pytest.fixture(scope="session")
def tiny_molecules(tmp_path_factory):
    from tiny_models import save_tiny_molecules

    return save_tiny_molecules(tmp_path_factory.mktemp("models") / "molecules")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    from tiny_models import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3")


@pytest.fixture(scope="session")
def two_round_run(s3_endpoint, _ray_session_shutdown, tiny_digits, classifier_dir, tmp_path_factory):
    """(config, pipeline records) of a finished two-round run (helpers.two_round_config), made
    once per session: the pipeline test checks it, the status and report tests read it."""
    from helpers import two_round_config
    from pipelines.pgraft_round import run_round_pipeline

    ensure_local_ray()
    cfg = two_round_config(tmp_path_factory.mktemp("two-rounds") / "run", tiny_digits, classifier_dir)
    return cfg, run_round_pipeline(cfg, progress=False)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A digits classifier trained for a few seconds: good enough to rank samples."""
    from pgraft.tasks import digits

    model, _ = digits.train_classifier(seed=0, epochs=5)
    out = tmp_path_factory.mktemp("task") / "classifier"
    digits.save_classifier(model, out)
    return out
