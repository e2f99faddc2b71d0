"""Choose a Store backend from a storage URL."""

from __future__ import annotations

from storage.base import Store
from storage.memory import MemoryStore
from storage.redis import RedisStore
from storage.redis_cluster import CLUSTER_SCHEMES

MEMORY_URL = "memory://"
REDIS_URL_PREFIXES = ("redis://", "rediss://", "unix://", *(f"{scheme}://" for scheme in CLUSTER_SCHEMES))
# What `storage.url` may start with.
STORAGE_URL_PREFIXES = (MEMORY_URL, *REDIS_URL_PREFIXES)


def open_store(
    url: str,
    *,
    key_prefix: str,
    retention_seconds: int,
    max_connections: int = 512,
    replica_acks: int = 0,
    replica_ack_timeout_ms: int = 1000,
) -> Store:
    """`memory://` gives the embedded store; `redis://…`, `rediss://…` and `unix://…` the Redis backend on one
    node; `redis+cluster://host:port[,host:port…]` (`rediss+cluster://` for TLS) the Redis backend on a Redis
    Cluster. `replica_acks` (Redis only): replicas that must have a terminal event before it is published."""
    if url == MEMORY_URL or url.startswith(MEMORY_URL):
        return MemoryStore(retention_seconds=retention_seconds)
    if url.startswith(REDIS_URL_PREFIXES):
        return RedisStore.from_url(
            url,
            key_prefix=key_prefix,
            retention_seconds=retention_seconds,
            max_connections=max_connections,
            replica_acks=replica_acks,
            replica_ack_timeout_ms=replica_ack_timeout_ms,
        )
    raise ValueError(f"unsupported storage URL scheme: {url.split(':', 1)[0]!r}")
