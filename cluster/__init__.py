"""How pgraft reaches Ray: a running cluster (RAY_ADDRESS, `ray job submit`) or a local one.

Stages run their units through `execute` (cluster/executor.py; inside `keep_warm`, pools and
train groups stay up for the next job of their shape while the cluster has room for the next
placement); `start_workers`, `iter_pool` and `run_pool` are its building blocks; trainers run
through `cluster.train_group.fit`. Every Ray call outside the filter's Ray engine goes
through this package.
"""

from cluster.executor import Execution, WorkerActor, execute, keep_warm, release_warm, run_job
from cluster.ray_cluster import (
    Placement,
    WorkerError,
    WorkerPool,
    alive_node_count,
    connect,
    current_actor_id,
    current_node_id,
    iter_pool,
    plan_placement,
    reserve,
    run_pool,
    run_task,
    start_workers,
    unwrap_remote_error,
)
from pgraft.work.spec import Finished, WorkerSpec

__all__ = ["Execution", "Finished", "Placement", "WorkerActor", "WorkerError", "WorkerPool", "WorkerSpec",
           "alive_node_count", "connect", "current_actor_id", "current_node_id", "execute", "iter_pool", "keep_warm",
           "plan_placement", "release_warm", "reserve", "run_job", "run_pool", "run_task", "start_workers", "unwrap_remote_error"]
