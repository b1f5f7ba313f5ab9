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

# --- Tiers (README, "Developing") ----------------------------------------------------------------
# A marker names what a test starts. Fixtures that start a service mark their users here, so a new
# test that asks for `s3_uri` or `ray_local` is in the right tier without remembering to say so;
# a test that starts one another way (a subprocess, the loopback rig, a train stage) says so
# with `pytestmark` or a decorator.
SERVICE_MARKERS = {
    "ray": "starts a local Ray (or a pgraft process that does)",
    "s3": "starts the moto S3 server process on loopback",
    "cluster": "starts the two-node loopback Ray rig (ray start --head + ray start --address)",
    "deepspeed": "starts DeepSpeed process groups (train rank actors)",
    "browser": "starts headless Chromium",
}
FIXTURE_MARKERS = {"s3_endpoint": ("s3",), "ray_local": ("ray",), "_ray_session_shutdown": ("ray",),
                   "two_round_run": ("ray", "deepspeed")}
# What a unit-tier test may not start, told by the command line of the process it tries to start.
SERVICE_COMMANDS = {"gcs_server": "ray", "raylet": "ray", "moto.server": "s3", "chromium": "browser"}


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("all", "unit", "services"), default="all",
                     help="unit: only tests that start no service (no Ray, S3 server, rig, DeepSpeed or browser), "
                          "and refuse any start; services: only the tests that start one; all: both")


# Not what a test starts but where it runs: `make test-services` runs the `cluster` tests and these
# in a second pytest process beside the rest, because they mostly wait (outages, restarts, jobs).
LANE_MARKER = "beside"


def pytest_configure(config):
    for name, meaning in SERVICE_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    config.addinivalue_line("markers", f"{LANE_MARKER}: make test-services runs it in the second pytest process, with "
                            "the cluster tests (it mostly waits)")
    if config.getoption("--tier") == "unit":
        sys.addaudithook(_refuse_service_starts)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in item.fixturenames:
            for marker in FIXTURE_MARKERS.get(fixture, ()):
                item.add_marker(marker)
    tier = config.getoption("--tier")
    if tier == "all":
        return
    keep, drop = [], []
    for item in items:
        starts_service = any(item.get_closest_marker(name) for name in SERVICE_MARKERS)
        (keep if starts_service == (tier == "services") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _refuse_service_starts(event: str, args: tuple) -> None:
    """Audit hook of the unit tier: a test that tries to start a service fails at once, naming
    the marker it lacks (so a mis-marked test cannot slow the fast tier down unnoticed)."""
    if event != "subprocess.Popen":
        return
    argv = args[1]
    command = " ".join(map(str, argv)) if isinstance(argv, (list, tuple)) else str(argv)
    for needle, marker in SERVICE_COMMANDS.items():
        if needle in command:
            raise RuntimeError(f"the unit tier starts no services, but this test starts {needle} ({command[:120]}); "
                               f"mark it `@pytest.mark.{marker}`")


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


@pytest.fixture
def warm_pools(ray_local):
    """The test runs inside `cluster.keep_warm()`: a job runs on the actors an earlier job with
    actors of the same shape left, whatever its worker class (their process start, mostly
    imports, is paid once), and every kept pool is released when the test ends, failed or not."""
    from cluster import keep_warm

    with keep_warm():
        yield


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
