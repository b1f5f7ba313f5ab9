"""The unit-of-work executor on a real local Ray: committed units skipped, each pending unit's
result yielded once, the pool released at the end, on an early stop and on a failed unit, and
kept inside `keep_warm` for the next execution whose actors have its shape, of any worker class."""

from __future__ import annotations

import pytest

import cluster


def tenfold_worker(rebuild_waits_for_calls: int = 0):
    """A plain worker class (defined here, so Ray ships it by value). With
    `rebuild_waits_for_calls`, a rebuild inside a call (a kept pool's next job) holds until that
    many calls are in flight on its actor, so the others are seen to wait for it (up to 30 s)."""

    class Tenfold:
        def __init__(self, offset: int):
            import torch

            if rebuild_waits_for_calls and calls_in_flight() >= 1:
                wait_until(lambda: calls_in_flight() >= rebuild_waits_for_calls, 30.0)
            self.offset, self.threads = offset, torch.get_num_threads()

        def __call__(self, unit: int):
            if unit < 0:
                raise ValueError(f"cannot take unit {unit}")
            return unit * 10 + self.offset, self.threads

    return Tenfold


def calls_in_flight() -> int:
    """Threads of this actor process inside a `WorkerActor.run` call (running or waiting for the
    worker's rebuild)."""
    import sys

    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith("executor.py"):
                count += 1
                break
            frame = frame.f_back
    return count


def wait_until(condition, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def spec(num_workers: int = 2, worker: type | None = None, offset: int = 1, calls_per_actor: int = 1,
         cpus: int | None = None, max_restarts: int = 0) -> cluster.WorkerSpec:
    return cluster.WorkerSpec(worker or tenfold_worker(), (offset,), "cpu", "model.device", num_workers,
                              calls_per_actor=calls_per_actor, placement_timeout_s=30, max_restarts=max_restarts,
                              cpus_per_worker=cpus)


def placement_removed(pool) -> bool:
    import ray.util

    return ray.util.placement_group_table(pool.group)["state"] == "REMOVED"


def test_committed_units_are_skipped_and_each_pending_result_comes_once(ray_local):
    run = cluster.execute(spec(), range(8), committed={1, 3}, desc="test", progress=False)
    assert (run.skipped, run.pending, run.workers, run.pool) == (2, [0, 2, 4, 5, 6, 7], 0, None)  # nothing started yet
    done = list(run)
    assert sorted(d.unit for d in done) == [0, 2, 4, 5, 6, 7]
    assert all(d.value[0] == d.unit * 10 + 1 for d in done)
    assert {d.value[1] for d in done} == {1}  # 2 CPUs over 2 actors: one torch thread each, set before the worker
    assert run.workers == 2 and len({d.actor_id for d in done}) == 2
    assert run.nodes == [cluster.current_node_id()]  # the local Ray's one node, reported by the executor
    assert run.pool.closed and placement_removed(run.pool)
    with pytest.raises(RuntimeError, match="runs once"):
        list(run)


def test_nothing_pending_places_no_pool(ray_local):
    run = cluster.execute(spec(), [0, 1], committed=lambda unit: True, progress=False)
    assert list(run) == [] and run.pool is None and (run.skipped, run.workers, run.nodes) == (2, 0, [])


def test_an_early_stop_closes_the_pool(ray_local):
    import ray

    run = cluster.execute(spec(num_workers=1), range(20), progress=False)
    for first in run:
        break
    assert first.value == (first.unit * 10 + 1, 2)  # one actor: both CPUs, two torch threads
    assert run.pool.closed and placement_removed(run.pool)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(run.pool.actors[0].run.remote(((1,), 0)))  # the actor is gone

    with cluster.execute(spec(), range(20), progress=False) as again:  # close() at the end of a `with` block,
        running = iter(again)  # while the consumer still holds the iterator
        next(running)
    assert again.pool.closed and placement_removed(again.pool)
    assert next(running, None) is None  # and the iterator is finished


def test_a_failed_unit_is_its_own_error_and_closes_the_pool(ray_local):
    run = cluster.execute(spec(), [0, 1, -1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="cannot take unit -1"):
        for _ in run:
            pass
    assert run.pool.closed and placement_removed(run.pool)


def test_keep_warm_runs_the_next_job_of_a_worker_class_on_the_same_actors(ray_local):
    worker = tenfold_worker(rebuild_waits_for_calls=2)
    with cluster.keep_warm():
        first = cluster.execute(spec(worker=worker, offset=1, calls_per_actor=2), range(4), progress=False)
        assert sorted(d.value[0] for d in first) == [1, 11, 21, 31]
        assert not first.pool.closed  # kept, placement and all
        # Two calls in flight per actor: the first rebuilds the worker, the second waits for it.
        second = cluster.execute(spec(worker=worker, offset=5, calls_per_actor=2), range(8), progress=False)
        done = list(second)
        assert second.pool is first.pool  # the same actors ...
        assert sorted(d.value[0] for d in done) == [u * 10 + 5 for u in range(8)]  # ... rebuilt their worker from the new arguments
        assert {d.value[1] for d in done} == {1}  # the threads set when the actor started
        other = cluster.execute(spec(num_workers=1, worker=worker), range(2), progress=False)
        list(other)  # another placement: the kept pool goes first, so its CPUs are free for this one
        assert first.pool.closed and placement_removed(first.pool) and not other.pool.closed
    assert other.pool.closed and placement_removed(other.pool)  # the block's end releases what it kept


def test_kept_pools_stay_while_the_next_one_fits_beside_them(ray_local):
    x, y = tenfold_worker(), tenfold_worker()  # one CPU each, two shapes (y's actors restart): both fit on the 2 CPUs
    with cluster.keep_warm():
        first = cluster.execute(spec(num_workers=1, worker=x, cpus=1), range(2), progress=False)
        list(first)
        beside = cluster.execute(spec(num_workers=1, worker=y, cpus=1, max_restarts=1), range(2), progress=False)
        list(beside)
        assert beside.pool is not first.pool  # another shape: a pool of its own ...
        assert not first.pool.closed and not placement_removed(first.pool)  # ... and room for both: x's pool stays
        again = cluster.execute(spec(num_workers=1, worker=x, offset=3, cpus=1), range(2), progress=False)
        assert sorted(d.value[0] for d in again) == [3, 13] and again.pool is first.pool
        wide = cluster.execute(spec(num_workers=2, worker=x, offset=4, cpus=1), range(2), progress=False)
        list(wide)  # two CPUs: neither kept pool fits beside it, both go first
        assert placement_removed(first.pool) and placement_removed(beside.pool) and not wide.pool.closed


def whoami_worker():
    """A second worker class: each unit returns the actor's pid and its process title during the call."""

    class Whoami:
        def __init__(self, offset: int):
            self.offset = offset

        def __call__(self, unit: int):
            import os

            return os.getpid(), process_title(os.getpid())

    return Whoami


def process_title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode().strip()


def test_a_job_of_another_worker_class_and_the_same_shape_runs_on_the_kept_actors_under_its_name(ray_local):
    tenfold, whoami = tenfold_worker(), whoami_worker()
    with cluster.keep_warm():
        first = cluster.execute(spec(num_workers=1, worker=tenfold, cpus=1), range(2), progress=False)
        assert sorted(d.value[0] for d in first) == [1, 11]
        second = cluster.execute(spec(num_workers=1, worker=whoami, cpus=1), range(3), progress=False)
        done = list(second)
        assert second.pool is first.pool  # the same actor, its worker rebuilt as the other class
        (pid,) = {d.value[0] for d in done}
        assert {d.value[1] for d in done} == {"ray::Whoami.run"}  # busy: titled after the work it does ...
        assert process_title(pid) == "ray::Whoami"  # ... and idle after it
        third = cluster.execute(spec(num_workers=1, worker=tenfold, offset=2, cpus=1), range(2), progress=False)
        assert sorted(d.value[0] for d in third) == [2, 12] and third.pool is first.pool
        assert process_title(pid) == "ray::Tenfold"
        # A job that asks for fewer actors of the shape runs on as many of a larger kept pool's.
        both = cluster.execute(spec(num_workers=2, worker=tenfold, cpus=1), range(4), progress=False)
        assert len({d.actor_id for d in both}) == 2
        one = cluster.execute(spec(num_workers=1, worker=whoami, cpus=1), range(3), progress=False)
        assert len({d.actor_id for d in one}) == 1 and one.workers == 1 and one.pool is both.pool
        # A job that keeps two calls in flight per actor needs actors started for two: a pool of its own.
        busy = cluster.execute(spec(num_workers=2, worker=tenfold, cpus=1, calls_per_actor=2), range(4), progress=False)
        list(busy)
        assert busy.pool is not both.pool and both.pool.closed
        single = cluster.execute(spec(num_workers=2, worker=whoami, cpus=1), range(4), progress=False)
        list(single)
        assert single.pool is busy.pool  # while one call at a time runs on actors started for two


def test_a_kept_pools_restarted_actor_rebuilds_the_worker_of_the_job_it_runs(ray_local):
    import ray

    worker = tenfold_worker()
    restartable = {"placement_timeout_s": 30, "max_restarts": 1}
    with cluster.keep_warm():
        first = cluster.execute(cluster.WorkerSpec(worker, (1,), num_workers=1, **restartable), range(2), progress=False)
        list(first)
        ray.kill(first.pool.actors[0], no_restart=False)  # Ray restarts it from its first arguments (offset 1)
        second = cluster.execute(cluster.WorkerSpec(worker, (7,), num_workers=1, **restartable), range(3), progress=False)
        done = list(second)
        assert second.pool is first.pool and sorted(d.value[0] for d in done) == [7, 17, 27]
