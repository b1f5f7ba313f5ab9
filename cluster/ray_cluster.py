"""Connect to Ray and size stage actors.

Inside `ray job submit` (or with RAY_ADDRESS set, e.g. after `ray start --head`) we join that
cluster; otherwise `ray.init()` starts a local one, the embedded default.
"""

from __future__ import annotations

import os

import ray


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster Ray would pick (RAY_ADDRESS / job context) or start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def worker_resources(num_workers: int, want_gpu: bool) -> tuple[int, dict]:
    """(actors to start, resources per actor): one GPU each where the cluster has GPUs,
    otherwise the CPUs split evenly. Capped at what fits at once, so no actor waits forever."""
    resources = ray.cluster_resources()
    if want_gpu and resources.get("GPU", 0) >= 1:
        return min(num_workers, int(resources["GPU"])), {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    count = min(num_workers, cpus)
    return count, {"num_cpus": max(1, cpus // count)}
