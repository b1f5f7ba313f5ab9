"""One way to run units of work on Ray actors: `execute(spec, units, committed)`.

A stage plans its units, says which are committed already (their output exists: a rerun
redoes only the rest), and describes its worker in a `WorkerSpec` (pgraft.work.spec): a plain
callable class, `__init__(*args)` loads, `__call__(unit)` does one unit. The executor skips
the committed units and, only when some are pending, places a pool of actors for the rest
(a placement group sized by the configured worker count; a demand that cannot be met is one
line naming the missing resource), feeds them with `calls_per_actor` calls in flight each,
restarts lost actors and retries their units (`max_restarts`), and yields each unit's result
as it finishes. The pool is released at the end, also when the consumer stops early or a
unit fails (its own one-line error is re-raised).

    spec = WorkerSpec(RewardWorker, (cfg_tree,), "cpu", "reward.device", num_workers=2)
    run = cluster.execute(spec, units, committed=lambda unit: unit[0] in done, desc="reward round 0")
    for finished in run:          # pgraft.work.Finished: unit, value, node_id, actor_id
        tally(finished.value)
    print(run.skipped, run.workers, run.nodes)

Each actor is a `WorkerActor` named after its worker (Ray's process titles read
`ray::GenerateWorker`): it sets torch's threads to the CPUs the actor holds (None on GPUs),
then builds the worker, so workers never deal with threads or Ray. Inside `keep_warm()` a pool
outlives its job and the next job whose actors have the same shape (resources, threads) runs
on it, whatever its worker: one process per actor samples, scores and summarises in turn.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Container, Iterable, Iterator

from cluster import ray_cluster
from cluster.ray_cluster import (WorkerPool, connect, current_actor_id, current_node_id, fits_beside, iter_pool,
                                 plan_placement, start_workers)
from pgraft.work.spec import Finished, WorkerSpec


class WorkerActor:
    """The Ray actor around one plain worker: torch threads first, then the worker; `run((worker,
    args, unit))` calls it and adds where the call ran (the node, and the actor's id, which a
    restart keeps). A call for another worker class or other arguments than the actor holds (a
    kept pool's next job, of this stage or another; or a restarted actor, which Ray rebuilds from
    its first arguments) rebuilds the worker first: the process, its imports and its placement
    stay. The actor then goes by the new worker's name (its process title reads
    `ray::RewardWorker` once it runs reward units), so whoever looks for a role's processes
    finds the processes doing that work."""

    def __init__(self, worker_cls: type, args: tuple, threads: int | None):
        if threads:  # the CPUs the actor holds: float summation order depends on it, so it is set here, once
            import torch

            torch.set_num_threads(threads)
        self.worker_cls, self.args = worker_cls, tuple(args)
        self.worker = worker_cls(*self.args)
        self.started_as = type(self)  # the class Ray made the actor from (it names the calls' titles)
        self.rebuilding = threading.Lock()  # calls run in threads when calls_per_actor > 1: one rebuilds, the rest wait

    def run(self, call: tuple) -> tuple[Any, str, str | None]:
        worker_cls, args, unit = call
        with self.rebuilding:
            if worker_cls is not self.worker_cls or tuple(args) != self.args:
                self.worker = None  # the old worker's models go before the new one loads its own
                self.worker = worker_cls(*args)
                self.worker_cls, self.args = worker_cls, tuple(args)
                self.__class__ = _named(self.started_as, worker_cls.__name__)
            worker = self.worker
        if self.worker_cls.__name__ != self.started_as.__name__:
            _set_process_title(f"ray::{self.worker_cls.__name__}.run")
        return worker(unit), current_node_id(), current_actor_id()


def _named(cls: type, name: str) -> type:
    """`cls` under another name: a subclass that adds nothing. Ray titles an idle actor's process
    after its instance's class name (`ray::<name>`), so an actor that runs another worker renames
    its class; Ray's own additions to the class stay inherited."""
    if cls.__name__ == name:
        return cls
    key = (cls, name)
    if key not in _RENAMED:
        _RENAMED[key] = type(name, (cls,), {"__module__": cls.__module__, "__qualname__": name})
    return _RENAMED[key]


_RENAMED: dict[tuple, type] = {}


def _set_process_title(title: str) -> None:
    """Ray titles a call's process `ray::<class the actor was made from>.<method>`; a kept actor
    that runs another worker's units says which. (Ray's own setter: Ray resets the title
    through it after the call.)"""
    import ray

    setter = getattr(ray._raylet, "setproctitle", None)
    if setter is not None:
        setter(title)


_ACTOR_CLASSES: dict[type, type] = {}


def actor_class(worker_cls: type) -> type:
    """`WorkerActor` under the worker's name, so that Ray's process titles and logs
    (`ray::GenerateWorker`) and placement errors ("GenerateWorker actors: …") name the worker."""
    cls = _ACTOR_CLASSES.get(worker_cls)
    if cls is None:
        name = worker_cls.__name__
        cls = type(name, (WorkerActor,), {"__module__": __name__, "__qualname__": name, "__doc__": WorkerActor.__doc__})
        _ACTOR_CLASSES[worker_cls] = cls
    return cls


class Execution:
    """The units of one `execute` call. Iterate it (once) to run the pending ones: it yields a
    `Finished` per unit as each one finishes. `pending` and `skipped` are known at once;
    `workers` (actors started, 0 when nothing was pending) and `nodes` (the Ray nodes that
    did the work, in the order they first finished a unit) fill in as it runs. `close()`
    (or leaving a `with` block) releases the pool early; running to the end, an error, or
    dropping the iterator release it too."""

    def __init__(self, spec: WorkerSpec, units: Iterable, committed: Callable[[Any], bool] | Container = (),
                 desc: str = "", progress: bool = True):
        is_committed = committed if callable(committed) else committed.__contains__
        self.spec, self.desc, self.progress = spec, desc or spec.name, progress
        self.units = list(units)
        self.pending = [unit for unit in self.units if not is_committed(unit)]
        self.skipped = len(self.units) - len(self.pending)
        self.workers = 0
        self.nodes: list[str] = []
        self.pool: WorkerPool | None = None
        self._started = False
        self._running = None  # a weak reference to the running generator

    def __iter__(self) -> Iterator[Finished]:
        if self._started:
            raise RuntimeError("an Execution runs once; call cluster.execute again")
        self._started = True
        running = self._run()
        self._running = weakref.ref(running)
        return running

    def _run(self) -> Iterator[Finished]:
        if not self.pending:
            return
        spec = self.spec
        connect()
        placement = plan_placement(spec.num_workers, spec.device, spec.device_key, spec.resources,
                                   spec.cpus_per_worker)
        count = min(placement.count, len(self.pending))
        key = _pool_key(placement, spec)
        self.pool = take_kept(key, count, spec.calls_per_actor)
        if self.pool is None:
            self.pool = start_workers(actor_class(spec.worker), spec.num_workers, spec.device, spec.device_key,
                                      len(self.pending), spec.worker, tuple(spec.args), extra_resources=spec.resources,
                                      timeout_s=spec.placement_timeout_s, max_restarts=spec.max_restarts,
                                      max_concurrency=spec.calls_per_actor, cpus_per_worker=spec.cpus_per_worker)
        keep = _WARM is not None
        calls = [(spec.worker, tuple(spec.args), unit) for unit in self.pending]
        actors = self.pool.actors[:count]  # a kept pool may hold more actors of this shape than the job asks for
        try:
            self.workers = len(actors)
            for (_, _, unit), (value, node_id, actor_id) in iter_pool(self.pool, "run", calls, self.desc, self.progress,
                                                                      spec.calls_per_actor, keep=keep, actors=actors):
                if node_id not in self.nodes:
                    self.nodes.append(node_id)
                yield Finished(unit, value, node_id, actor_id)
            if keep:
                keep_pool(key, self.pool)
        finally:
            if not _is_kept(self.pool):
                self.pool.close()  # iter_pool closed it already, unless it never started or is kept

    def close(self) -> None:
        running = self._running() if self._running is not None else None
        if running is not None:
            running.close()
        if self.pool is not None and not _is_kept(self.pool):
            self.pool.close()

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Pools kept by the open `keep_warm()` block, by key (None: no block open, nothing is kept).
_WARM: dict[tuple, WorkerPool] | None = None


def _pool_key(placement, spec: WorkerSpec) -> tuple:
    """What makes a kept pool fit another job, of any worker class: the same resources and
    threads per actor and restart budget (the job runs on as many of its actors as it asks for,
    and needs actors that run as many calls at once as it keeps in flight: `take_kept`)."""
    return ("workers", tuple(sorted(placement.bundle.items())), placement.threads, spec.max_restarts)


def take_kept(key: tuple, actors_needed: int, calls_per_actor: int = 1) -> WorkerPool | None:
    """The kept pool under `key` when there is one with at least `actors_needed` live actors that
    each run `calls_per_actor` calls at once or more (it leaves the keep: the caller returns it
    with `keep_pool` or closes it); None otherwise (an unfit pool is released)."""
    if not _WARM:
        return None
    pool = _WARM.pop(key, None)
    if (pool is not None and not pool.closed and len(pool.actors) >= actors_needed
            and pool.max_concurrency >= calls_per_actor):
        return pool
    if pool is not None:
        pool.close()
    return None


def keep_pool(key: tuple, pool: WorkerPool) -> bool:
    """Keep `pool` under `key` for a later job when a `keep_warm()` block is open; False (the
    caller closes it) otherwise."""
    if _WARM is None or pool.closed:
        return False
    old = _WARM.pop(key, None)
    if old is not None and old is not pool:
        old.close()
    _WARM[key] = pool
    return True


def _is_kept(pool: WorkerPool) -> bool:
    return _WARM is not None and any(kept is pool for kept in _WARM.values())


def _make_room(placement) -> None:
    """Before a placement is reserved: release the kept pools unless it fits beside them."""
    if _WARM and not fits_beside(placement, [pool.group for pool in _WARM.values()]):
        release_warm()


def release_warm() -> None:
    """Release the pools a `keep_warm()` block keeps (the block stays open)."""
    if _WARM:
        for pool in _WARM.values():
            pool.close()
        _WARM.clear()


@contextmanager
def keep_warm() -> Iterator[None]:
    """Inside this block, a pool whose work all finished stays up, and the next job whose actors
    have the same shape (`_pool_key`, `take_kept`) runs on it, whatever its worker class: its
    actors rebuild their worker (another stage, model or round), while process start-up, the
    imports they share (torch) and placement are paid once. The train group's ranks are kept
    the same way (cluster/train_group.py). Kept pools hold their resources only while the
    cluster has room: before any placement is reserved, they are released unless it fits
    beside them, so a kept pool never holds resources that the next one waits for. Every kept pool is released when the block ends (an
    inner block joins the outer one)."""
    global _WARM
    if _WARM is not None:
        yield
        return
    _WARM = {}
    ray_cluster._MAKE_ROOM = _make_room
    try:
        yield
    finally:
        ray_cluster._MAKE_ROOM = None
        release_warm()
        _WARM = None


def execute(spec: WorkerSpec, units: Iterable, committed: Callable[[Any], bool] | Container = (), desc: str = "",
            progress: bool = True) -> Execution:
    """Run `units` on a pool of `spec.worker` actors, skipping those `committed` says are done
    (a predicate on a unit, or a container of units); iterate the result for each unit's
    `Finished` as it finishes. `desc` names the work in progress lines. Nothing starts
    before the iteration does, and no pool is placed when nothing is pending."""
    return Execution(spec, units, committed, desc, progress)


def run_job(job, desc: str, progress: bool = True, spec: WorkerSpec | None = None):
    """Drive a stage's job through `execute`, the one driver shape of generate, reward and the
    evaluation's variants: `job` has `units`, `is_committed(unit)`, `spec()` (or `spec` given),
    `add(finished)` per unit done now and `finish(seconds, skipped, workers, nodes)`, which
    returns the stage summary."""
    import time

    start = time.perf_counter()
    run = execute(spec or job.spec(), job.units, job.is_committed, desc, progress)
    for done in run:
        job.add(done)
    return job.finish(time.perf_counter() - start, run.skipped, run.workers, run.nodes)
