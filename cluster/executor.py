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
then builds the worker, so workers never deal with threads or Ray.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Container, Iterable, Iterator

from cluster.ray_cluster import WorkerPool, current_actor_id, current_node_id, iter_pool, start_workers
from pgraft.work.spec import Finished, WorkerSpec


class WorkerActor:
    """The Ray actor around one plain worker: torch threads first, then the worker; `run(unit)`
    calls it and adds where the call ran (the node, and the actor's id, which a restart keeps)."""

    def __init__(self, worker_cls: type, args: tuple, threads: int | None):
        if threads:  # the CPUs the actor holds: float summation order depends on it, so it is set here, once
            import torch

            torch.set_num_threads(threads)
        self.worker = worker_cls(*args)

    def run(self, unit) -> tuple[Any, str, str | None]:
        return self.worker(unit), current_node_id(), current_actor_id()


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
        self.pool = start_workers(actor_class(spec.worker), spec.num_workers, spec.device, spec.device_key,
                                  len(self.pending), spec.worker, tuple(spec.args), extra_resources=spec.resources,
                                  timeout_s=spec.placement_timeout_s, max_restarts=spec.max_restarts,
                                  max_concurrency=spec.calls_per_actor)
        try:
            self.workers = len(self.pool.actors)
            for unit, (value, node_id, actor_id) in iter_pool(self.pool, "run", self.pending, self.desc, self.progress,
                                                              spec.calls_per_actor):
                if node_id not in self.nodes:
                    self.nodes.append(node_id)
                yield Finished(unit, value, node_id, actor_id)
        finally:
            self.pool.close()  # iter_pool closed it already, unless it never started

    def close(self) -> None:
        running = self._running() if self._running is not None else None
        if running is not None:
            running.close()
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
