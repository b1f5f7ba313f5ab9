"""How pgraft reaches Ray: a running cluster (RAY_ADDRESS, `ray job submit`) or a local one."""

from cluster.ray_cluster import connect, worker_resources

__all__ = ["connect", "worker_resources"]
