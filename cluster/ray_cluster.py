"""Connect to Ray, place stage actors by the resources they declare, and run work on them.

Inside `ray job submit` (or with RAY_ADDRESS set, e.g. after `ray start --head`) we join that
cluster; otherwise `ray.init()` starts a local one, the embedded default. The process that
calls these functions only orchestrates: every model lives in an actor placed by resources.

Placement goes through a placement group, so a demand the cluster cannot meet now (GPU
nodes at `min_workers: 0`) is visible to the autoscaler, and a demand it never meets ends
after `cluster.placement_timeout_s` with one line naming the missing resource.
"""

from __future__ import annotations

import os
import re
import socket
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlparse

import ray

from pgraft.errors import PgraftError

# Set when this process started a local Ray itself: no autoscaler can add nodes to it, so a
# placement that does not fit fails at once instead of after the configured wait.
_STARTED_LOCAL = False
LOCAL_PLACEMENT_TIMEOUT_S = 5.0


class WorkerError(PgraftError):
    """Stage actors cannot be placed or started, or failed in a way their own error type did not describe."""


def _check_reachable(address: str) -> None:
    """Fail in seconds with one line when RAY_ADDRESS names a host:port that does not answer
    (ray.init would otherwise retry for a long time)."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=3).close()
    except OSError as exc:
        raise WorkerError(f"the Ray cluster at RAY_ADDRESS={address} does not answer ({exc.strerror or exc}); "
                          "start it (`ray start --head`) or unset RAY_ADDRESS to run on a local Ray") from None


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster Ray would pick (RAY_ADDRESS / job context) or start a local one."""
    global _STARTED_LOCAL
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise WorkerError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {first}") from None
    else:
        # No dashboard: this Ray lives for one command, and its dashboard costs ~1.5 s of start-up
        # and a process on the cores the work needs. For one, start `ray start --head` and set
        # RAY_ADDRESS (the branch above).
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        _STARTED_LOCAL = True


def current_node_id() -> str:
    """The Ray node this process runs on (recorded in stage summaries: what ran where)."""
    return ray.get_runtime_context().get_node_id()


def current_actor_id() -> str | None:
    """The Ray actor this call runs in (None outside actors); it stays the same when Ray restarts the actor."""
    return ray.get_runtime_context().get_actor_id()


def _alive_nodes() -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def alive_node_count() -> int:
    """How many nodes the cluster has now."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


@dataclass
class Placement:
    """How many actors a stage starts and what each one asks Ray for."""

    count: int
    num_cpus: float
    num_gpus: float = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.extra}
        return {k: v for k, v in bundle.items() if v}

    @property
    def threads(self) -> int | None:
        """torch threads per actor: its CPU share on CPU actors, torch's default on GPUs."""
        return None if self.num_gpus else max(1, int(self.num_cpus))

    def actor_options(self) -> dict:
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.extra:
            options["resources"] = dict(self.extra)
        return options


def plan_placement(num_workers: int, device: str, device_key: str, extra: dict[str, float] | None = None,
                   cpus_per_worker: int | None = None, exact: bool = False) -> Placement:
    """Actors and resources for a stage whose models go on `device` (`device_key` names that
    config key). GPUs are declared whenever the device asks for them (`cuda`, or `auto` on a
    cluster that has GPUs), so an autoscaler can add GPU nodes; on CPU, the CPUs of the nodes
    that offer `extra` are split evenly, never more per actor than one node has. Sized by the
    configured count, so threads per worker (and float summation order) do not depend on how
    much work is left. `exact` keeps the count even where it cannot fit (a training group
    of that size or an error, never a smaller group)."""
    extra = dict(extra or {})
    nodes = [n for n in _alive_nodes() if all(n.get(k, 0) >= v for k, v in extra.items())] or _alive_nodes()
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if device.startswith("cuda") and gpus < 1 and _STARTED_LOCAL:
        raise WorkerError(f"{device_key}={device} but the Ray cluster has no GPUs; use {device_key}=auto or cpu")
    if device.startswith("cuda") or (device == "auto" and gpus >= 1):
        count = min(num_workers, int(gpus)) if gpus >= 1 and not exact else num_workers
        return Placement(count, 1, 1, extra)
    node_cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1] or [1]
    count = num_workers if exact else min(num_workers, sum(node_cpus))
    return Placement(count, cpus_per_worker or cpu_share(node_cpus, count), 0, extra)


def cpu_share(node_cpus: list[int], count: int) -> int:
    """The largest whole CPU count per actor such that `count` actors fit on these nodes
    (actors do not span nodes); at least 1."""
    for share in range(max(node_cpus), 0, -1):
        if sum(cpus // share for cpus in node_cpus) >= count:
            return share
    return 1


def _describe_cluster() -> str:
    nodes = _alive_nodes()
    shown = []
    for n in nodes:
        keys = ["CPU", "GPU"] + sorted(k for k in n if not k.startswith(("node:", "memory", "object_store", "CPU", "GPU",
                                                                        "accelerator_type")))
        shown.append("{" + ", ".join(f"{k}: {n.get(k, 0):g}" for k in keys) + "}")
    return f"{len(nodes)} node(s): " + ", ".join(shown)


def _missing(bundle: dict[str, float], count: int) -> str:
    nodes = _alive_nodes()
    for key, need in bundle.items():
        if not any(n.get(key, 0) >= need for n in nodes):
            return f"no node offers {key} ≥ {need:g}"
    for key, need in bundle.items():
        have = sum(n.get(key, 0) for n in nodes)
        if have < need * count:
            return f"{count} × {key} {need:g} = {need * count:g} needed, the cluster has {have:g}"
    return "the resources exist but are held by other work"


def fits_beside(placement: Placement, held_groups: list) -> bool:
    """Whether `placement.count` bundles fit on the alive nodes once the bundles of `held_groups`
    (placement groups this process holds) are taken off each node's total: a first-fit count on
    our own holdings only (work of other jobs is not seen; the reservation waits for it as usual)."""
    from ray.util.placement_group import placement_group_table

    free = {node["NodeID"]: dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")}
    for group in held_groups:
        table = placement_group_table(group)
        for index, bundle in table.get("bundles", {}).items():
            node = free.get(table.get("bundles_to_node_id", {}).get(index))
            for key, amount in bundle.items() if node is not None else ():
                node[key] = node.get(key, 0) - amount
    placed = 0
    for node in free.values():
        while placed < placement.count and all(node.get(k, 0) >= v - 1e-9 for k, v in placement.bundle.items()):
            for key, amount in placement.bundle.items():
                node[key] -= amount
            placed += 1
    return placed >= placement.count


# Called with each placement before it is reserved (cluster/executor.py sets it while pools are kept
# warm: it releases them unless the new placement fits beside them).
_MAKE_ROOM = None


def reserve(placement: Placement, what: str, timeout_s: float, strategy: str = "SPREAD"):
    """A ready placement group for `placement.count` bundles, or WorkerError naming what is
    missing once `timeout_s` has passed (an autoscaler sees the pending group as demand)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    if _MAKE_ROOM is not None:
        _MAKE_ROOM(placement)
    if _STARTED_LOCAL:
        timeout_s = min(timeout_s, LOCAL_PLACEMENT_TIMEOUT_S)
    group = placement_group([placement.bundle] * placement.count, strategy=strategy)
    if not group.wait(timeout_seconds=timeout_s):
        missing = _missing(placement.bundle, placement.count)
        remove_placement_group(group)
        raise WorkerError(f"{what}: {placement.count} × {placement.bundle} could not be placed within {timeout_s:g} s: "
                          f"{missing} ({_describe_cluster()}); lower the stage's num_workers, fix its device or "
                          "resources keys, or add nodes (cluster.placement_timeout_s sets the wait)")
    return group


@dataclass
class WorkerPool:
    """Actors of one stage inside their placement group."""

    actors: list
    group: object
    placement: Placement
    closed: bool = False
    max_concurrency: int = 1  # calls each actor can run at once (Ray's option, fixed when it starts)

    def close(self) -> None:
        """Kill the actors and release their placement group (once; later calls do nothing)."""
        from ray.util.placement_group import remove_placement_group

        if self.closed:
            return
        self.closed = True
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


def start_workers(worker_cls, num_workers: int, device: str, device_key: str, needed: int, *args,
                  extra_resources: dict | None = None, timeout_s: float = 300.0, max_restarts: int = 3,
                  max_concurrency: int = 1, cpus_per_worker: int | None = None, exact: bool = False,
                  strategy: str = "SPREAD", what: str | None = None) -> WorkerPool:
    """Start up to `needed` actors of `worker_cls(*args, threads)`, where `threads` is the CPUs
    each actor holds (None on GPUs), for torch.set_num_threads. A lost actor is restarted up to
    `max_restarts` times and the calls it was running are retried on the new one. With
    `max_concurrency` > 1 an actor runs that many calls at once, each in its own thread (the
    worker class must be thread-safe). `cpus_per_worker` fixes each actor's CPUs (default: an
    even share of a node); `exact` keeps the count even where it cannot fit (see
    `plan_placement`), `strategy` is the placement group's (SPREAD, PACK) and `what` names the
    actors in placement errors (default: "<class> actors")."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    connect()
    placement = plan_placement(num_workers, device, device_key, extra_resources, cpus_per_worker, exact=exact)
    placement.count = min(placement.count, needed)
    group = reserve(placement, what or f"{worker_cls.__name__} actors", timeout_s, strategy)
    pool = WorkerPool([], group, placement, max_concurrency=max_concurrency)
    try:
        remote = ray.remote(worker_cls)
        for i in range(placement.count):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            pool.actors.append(remote.options(**placement.actor_options(), max_restarts=max_restarts,
                                              max_task_retries=max_restarts, max_concurrency=max_concurrency,
                                              scheduling_strategy=strategy)
                               .remote(*args, placement.threads))
    except BaseException:
        pool.close()
        raise
    return pool


def _call(fn, *args):
    return fn(*args)


def run_task(fn, args: tuple, placement: Placement, what: str, timeout_s: float):
    """`fn(*args)` as one Ray task inside a reserved bundle (so a demand the cluster never
    meets is one line, not a wait forever); its result, or the task's own error. `fn` is any
    picklable callable (a task's `lazy` reference too: `ray.remote` takes only functions, so the
    task calls it)."""
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    connect()
    group = reserve(placement, what, timeout_s)
    try:
        options = placement.actor_options()
        task = ray.remote(_call).options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0))
        try:
            return ray.get(task.remote(fn, *args))
        except Exception as exc:  # noqa: BLE001 - re-raised as the task's own error
            raise unwrap_remote_error(exc) from None
    finally:
        remove_placement_group(group)


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


def iter_pool(pool: WorkerPool, method: str, items: list, desc: str, progress: bool = True,
              calls_per_actor: int = 1, keep: bool = False, actors: list | None = None):
    """Feed `items` to `actor.<method>` over the pool, keeping up to `calls_per_actor` calls in
    flight per actor (more than one only pays on actors started with that `max_concurrency`)
    and refilling whichever actor finishes first; yields `(item, result)` as each one finishes
    (the next item goes to that actor once the consumer asks for the next result). A lost
    actor's items are retried by Ray on the restarted actor; a failure that survives the
    retries stops the pool and is re-raised as the worker's own error. The actors and their
    placement group are released at the end, also when the consumer stops early; with `keep`
    a pool that ran every item stays up for the caller to reuse or close. `actors`: those of the
    pool's actors to feed (default: all)."""
    from pgraft.progress import progress_bar

    queue = deque(items)
    in_flight = {}
    bar = progress_bar(len(items), desc, "unit", enabled=progress)

    def submit(actor) -> None:
        item = queue.popleft()
        in_flight[getattr(actor, method).remote(item)] = (actor, item)

    finished = False
    try:
        for _ in range(calls_per_actor):  # round by round, so a short queue still reaches every actor
            for actor in (pool.actors if actors is None else actors):
                if queue:
                    submit(actor)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor, item = in_flight.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - re-raised as the worker's own error
                raise unwrap_remote_error(exc) from None
            yield item, result
            bar.update(1)
            if queue:
                submit(actor)  # the actor that finished: never more than calls_per_actor on one actor
        finished = True
    finally:
        bar.close()
        if not (keep and finished):
            pool.close()


def run_pool(pool: WorkerPool, method: str, items: list, on_result, desc: str, progress: bool = True,
             calls_per_actor: int = 1) -> None:
    """`iter_pool` with `on_result(result)` run here once per item, in the order they finish."""
    for _, result in iter_pool(pool, method, items, desc, progress, calls_per_actor):
        on_result(result)
