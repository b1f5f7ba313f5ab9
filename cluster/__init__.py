"""How pgraft reaches Ray: a running cluster (RAY_ADDRESS, `ray job submit`) or a local one."""

from cluster.ray_cluster import WorkerError, connect, run_pool, start_workers, unwrap_remote_error, worker_resources

__all__ = ["WorkerError", "connect", "run_pool", "start_workers", "unwrap_remote_error", "worker_resources"]
