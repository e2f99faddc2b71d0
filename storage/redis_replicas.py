"""Waiting for replicas to acknowledge a response's terminal event before anyone is told of it
(`storage.replica_acks`).

Redis replicates asynchronously: a master acknowledges a write as soon as it has applied it, and a failover to a
replica that had not received it yet loses it. `WAIT n timeout` blocks until `n` replicas have acknowledged every
write the calling connection has made. The terminal append runs on the shared auto-pipelined connection, whose
clients must never queue behind a blocking WAIT, so the wait goes out on a connection of its own, after a write of
its own to the same key: the replication stream is ordered, so once replicas have that write they have the
terminal append before it too.
"""

from __future__ import annotations

import contextlib
import logging

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from storage.base import StoreUnavailable
from storage.redis_cluster import ClusterAddress, relearn_slots

log = logging.getLogger(__name__)


class ReplicaAcks:
    """`wait(key)`: WAIT for `replicas` acknowledgements (at most `timeout_ms`) on the node that holds `key`."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        replicas: int,
        timeout_ms: int,
        ttl_ms: int,
        cluster: ClusterAddress | None = None,
    ) -> None:
        self._client = client
        self._cluster = cluster
        self.replicas = replicas
        self._timeout_ms = timeout_ms
        self._ttl_ms = ttl_ms
        # On a cluster: a client per node (name -> client), for a WAIT on the node that holds the key.
        self._node_clients: dict[str, aioredis.Redis] = {}
        # Terminal events published with fewer acknowledgements than asked for (WAIT timed out).
        self.shortfalls = 0

    async def wait(self, key: str) -> None:
        """Returns once `replicas` replicas have every write made to `key` so far, or the timeout has passed (then
        logged and counted: the event is published anyway). Raises StoreUnavailable when the node cannot be
        reached (the caller's append is retried, and waited for again, on whichever node holds the key then)."""
        connection = await self._connection_for(key)
        pipe = connection.pipeline(transaction=False)
        # A write of this connection's own (the same TTL the append just set), for WAIT to wait for.
        pipe.pexpire(key, self._ttl_ms)
        pipe.execute_command("WAIT", self.replicas, self._timeout_ms)
        try:
            _, acknowledged = await pipe.execute()
        except ResponseError as error:  # MOVED: the key's slot is served elsewhere now (a failover)
            if isinstance(self._client, RedisCluster):
                await relearn_slots(self._client, error)
            raise StoreUnavailable(f"redis: waiting for replicas: {error}") from error
        if int(acknowledged) < self.replicas:
            self.shortfalls += 1
            log.warning(
                "%s: %d of %d replicas acknowledged the terminal event within %d ms; publishing it anyway",
                key,
                int(acknowledged),
                self.replicas,
                self._timeout_ms,
            )

    async def _connection_for(self, key: str) -> aioredis.Redis:
        if not isinstance(self._client, RedisCluster):
            return self._client  # a connection from the shared pool, never the auto-pipelined one
        assert self._cluster is not None
        await self._client.initialize()
        node = self._client.get_node_from_key(key)
        if node is None:
            raise StoreUnavailable(f"redis cluster: no node holds {key}")
        client = self._node_clients.get(node.name)
        if client is None:
            client = self._cluster.node_client(node)
            self._node_clients[node.name] = client
        return client

    async def close(self) -> None:
        for client in self._node_clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._node_clients.clear()
