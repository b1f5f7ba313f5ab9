"""Connect to Ray and size stage actors.

Inside `ray job submit` (or with RAY_ADDRESS set, e.g. after `ray start --head`) we join that
cluster; otherwise `ray.init()` starts a local one, the embedded default.
"""

from __future__ import annotations

import os
import re

import ray


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster Ray would pick (RAY_ADDRESS / job context) or start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


class WorkerError(RuntimeError):
    """Stage actors cannot start, or failed in a way their own error type did not describe."""


def worker_resources(num_workers: int, device: str, device_key: str) -> tuple[int, dict]:
    """(actors to start, resources per actor) for a stage whose config puts its models on
    `device` (`device_key` names that config key): one GPU each where the cluster has GPUs and
    the device is not `cpu`, otherwise the CPUs split evenly. Capped at what fits at once, so
    no actor waits forever; sized by the configured count, so threads per worker (and so
    float summation order) do not depend on how much work is left."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device.startswith("cuda") and gpus < 1:
        raise WorkerError(f"{device_key}={device} but the Ray cluster has no GPUs; use {device_key}=auto or cpu")
    if device != "cpu" and gpus >= 1:
        return min(num_workers, gpus), {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    count = min(num_workers, cpus)
    return count, {"num_cpus": max(1, cpus // count)}


def start_workers(worker_cls, num_workers: int, device: str, device_key: str, needed: int, *args) -> list:
    """Start up to `needed` actors of `worker_cls(*args, threads)`; `threads` is the CPUs each
    actor holds (None on GPUs), for torch.set_num_threads."""
    connect()
    count, resources = worker_resources(num_workers, device, device_key)
    threads = None if "num_gpus" in resources else resources["num_cpus"]
    remote = ray.remote(worker_cls).options(**resources)
    return [remote.remote(*args, threads) for _ in range(min(count, needed))]


def unwrap_remote_error(exc: Exception) -> Exception:
    """Ray wraps a remote exception; give back the original (one-line) error where possible."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception):
        return cause
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else exc.__class__.__name__
    # An actor that failed to start reports "module.SomeError: message" as its last line.
    match = re.match(r"^[\w.]+(Error|Exception): (.*)$", last)
    return WorkerError(f"worker failed to start: {match.group(2)}" if match else f"worker failed: {last}")


def run_pool(actors: list, method: str, items: list, on_result, desc: str, progress: bool = True) -> None:
    """Feed `items` to `actor.<method>` over a pool of actors, refilling whichever finishes
    first; `on_result(result)` runs on the driver per item. The first failure stops the pool
    and is re-raised as the worker's own error. Actors are killed at the end."""
    from tqdm.auto import tqdm

    queue = list(items)
    in_flight = {}
    for actor in actors:
        if queue:
            in_flight[getattr(actor, method).remote(queue.pop(0))] = actor
    bar = tqdm(total=len(items), desc=desc, unit="shard", disable=not progress)
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - re-raised as the worker's own error
                raise unwrap_remote_error(exc) from None
            on_result(result)
            bar.update(1)
            if queue:
                in_flight[getattr(actor, method).remote(queue.pop(0))] = actor
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
