"""How pgraft reaches Ray: a running cluster (RAY_ADDRESS, `ray job submit`) or a local one."""

from cluster.ray_cluster import (
    Placement,
    WorkerError,
    WorkerPool,
    connect,
    current_actor_id,
    current_node_id,
    plan_placement,
    reserve,
    run_pool,
    run_task,
    start_workers,
    unwrap_remote_error,
)

__all__ = ["Placement", "WorkerError", "WorkerPool", "connect", "current_actor_id", "current_node_id", "plan_placement",
           "reserve", "run_pool", "run_task", "start_workers", "unwrap_remote_error"]
