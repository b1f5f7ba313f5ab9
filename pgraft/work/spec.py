"""What a pool of workers is made of and asks the cluster for (plain data: no Ray here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """One actor per worker, each running `worker(*args)`; `cluster.execute` places and runs them.

    `device` is where the worker's models go (`device_key` names that config key in errors);
    `num_workers` is the configured count (the actors' CPU share, and so their torch threads,
    follows it, not how much work is left); `resources` are custom resources every actor asks
    for (a node type); `calls_per_actor` > 1 runs that many units at once per actor, each in
    its own thread (the worker must be thread-safe); a lost actor is restarted, and its units
    retried, up to `max_restarts` times; `cpus_per_worker` fixes each actor's CPUs (and torch
    threads) instead of the even share of a node."""

    worker: type
    args: tuple = ()
    device: str = "cpu"
    device_key: str = "model.device"
    num_workers: int = 1
    resources: dict = field(default_factory=dict)
    calls_per_actor: int = 1
    placement_timeout_s: float = 300.0
    max_restarts: int = 3
    cpus_per_worker: int | None = None

    @property
    def name(self) -> str:
        return self.worker.__name__


@dataclass(frozen=True)
class Finished:
    """One unit done, as `cluster.execute` yields it: the unit, what the worker returned for it,
    and where it ran (a restarted actor keeps its id)."""

    unit: Any
    value: Any
    node_id: str
    actor_id: str | None = None
