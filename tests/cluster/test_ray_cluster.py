"""Joining Ray and placing actors: an address that does not answer, placement by device and
custom resources, never more CPUs per actor than one node has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cluster
from cluster import ray_cluster

REPO = Path(__file__).resolve().parents[2]


def test_unreachable_cluster_address_is_one_line_and_fast(tiny_digits, tmp_path):
    from conftest import free_port

    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    args = [sys.executable, "-m", "stages.generate", "--quiet", "--set", f"run.uri={tmp_path / 'run'}",
            "--set", f"model.path={tiny_digits}"]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Ray cluster at RAY_ADDRESS=127.0.0.1:" in lines[0] and "does not answer" in lines[0]


def test_a_task_reference_runs_as_a_placed_ray_task(ray_local):
    from pgraft.tasks import lazy

    # What the round pipeline does with TaskSpec.pretrain (a lazy reference, not a function).
    placement = cluster.plan_placement(1, "cpu", "task")
    assert cluster.run_task(lazy("math:hypot"), (3.0, 4.0), placement, "a lazy task", 60.0) == 5.0


def test_placement_by_device_and_node_cpus(ray_local, monkeypatch):
    nodes = [{"CPU": 2.0, "memory": 1.0}, {"CPU": 8.0, "GPU": 2.0, "gpu_node": 1.0}]
    monkeypatch.setattr(ray_cluster, "_alive_nodes", lambda: nodes)
    cpu = cluster.plan_placement(4, "cpu", "model.device")
    assert (cpu.count, cpu.num_cpus, cpu.num_gpus, cpu.threads) == (4, 2, 0, 2)  # 10 CPUs / 4, whole CPUs
    one = cluster.plan_placement(1, "cpu", "model.device")
    assert one.num_cpus == 8  # never more than the largest node has
    gpu = cluster.plan_placement(4, "auto", "model.device")
    assert (gpu.count, gpu.bundle) == (2, {"CPU": 1, "GPU": 1})  # auto takes GPUs when there are some
    exact = cluster.plan_placement(4, "cuda", "model.device", exact=True)
    assert exact.count == 4  # a train group is never shrunk
    pinned = cluster.plan_placement(2, "cpu", "model.device", {"gpu_node": 1})
    assert pinned.num_cpus == 4 and pinned.bundle == {"CPU": 4, "gpu_node": 1}  # only the gpu_node node's CPUs
    monkeypatch.setattr(ray_cluster, "_alive_nodes", lambda: [{"CPU": 2.0}, {"CPU": 5.0}])
    assert cluster.plan_placement(2, "cpu", "model.device").num_cpus == 2  # 2 × 3 CPUs would not fit: actors do not span nodes
    monkeypatch.setattr(ray_cluster, "_alive_nodes", lambda: [{"CPU": 2.0}])
    declared = cluster.plan_placement(2, "cuda", "model.device")
    assert declared.bundle == {"CPU": 1, "GPU": 1} and declared.count == 2  # demand an autoscaler can meet


def test_unplaceable_custom_resource_names_what_is_missing(ray_local):
    placement = cluster.Placement(1, 1, 0, {"gpu_node": 1})
    with pytest.raises(cluster.WorkerError, match=r"could not be placed within 1 s: no node offers gpu_node ≥ 1"):
        cluster.reserve(placement, "test actors", 1)


@pytest.mark.ray
def test_cuda_on_a_local_ray_without_gpus_fails_at_once(tiny_digits, tmp_path):
    """A Ray that pgraft starts itself has no autoscaler: no waiting for a GPU that never comes."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "stages.generate", "--quiet", "--set", f"run.uri={tmp_path / 'run'}",
            "--set", f"model.path={tiny_digits}", "--set", "model.device=cuda"]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("pgraft generate: error: model.device=cuda but the Ray cluster has "
                                                   "no GPUs; use model.device=auto or cpu")


def test_run_pool_keeps_calls_per_actor_in_flight_and_returns_each_item_once(ray_local):
    import threading
    import time

    class Counting:
        """Counts its calls running at once; its max_concurrency (4) leaves the limit to run_pool."""

        def __init__(self, threads=None):
            self.lock, self.running, self.most = threading.Lock(), 0, 0

        def work(self, item):
            import ray

            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            deadline = time.monotonic() + 30  # hold until a second call runs beside this one (or fail below)
            while self.most < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            with self.lock:
                self.running -= 1
            return {"item": item, "actor": ray.get_runtime_context().get_actor_id(), "most": self.most}

    pool = cluster.start_workers(Counting, 2, "cpu", "model.device", 12, max_concurrency=4)
    results = []
    cluster.run_pool(pool, "work", list(range(12)), results.append, "test", progress=False, calls_per_actor=2)
    assert sorted(r["item"] for r in results) == list(range(12))  # on_result once per item
    most = {}
    for r in results:
        most[r["actor"]] = max(most.get(r["actor"], 0), r["most"])
    assert len(most) == 2 and set(most.values()) == {2}  # both actors ran two calls at once, never more
