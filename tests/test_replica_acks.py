"""`storage.replica_acks`: a terminal event is published only once that many replicas have it (WAIT on the master
of its slot), or once the wait has timed out (counted, and published anyway).

On the test cluster every master has a replica, so the wait is met and the replica already holds the response as
completed when its client hears of it; a single node has none, so every wait times out and is counted."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from gateway.config import ConfigError, load_settings
from gateway.state import STORE
from storage.keys import KeySpace
from storage.redis import RedisStore
from tests.conftest import serve_gateway
from tests.lifecycle_checks import real_store


def acks_settings(storage_url: str, simulator_url: str, key_prefix: str) -> Any:
    return load_settings(
        storage={
            "url": storage_url,
            "key_prefix": key_prefix,
            "retention_seconds": 600,
            "replica_acks": 1,
            "replica_ack_timeout_ms": 300,
        },
        upstreams=[{"name": "sim", "kind": "responses", "base_url": f"{simulator_url}/v1", "max_retries": 0}],
    )


async def test_a_terminal_event_waits_for_a_replica(
    shared_redis_url: str,
    shared_redis_client: aioredis.Redis | RedisClusterClient,
    simulator_url: str,
    key_prefix: str,
) -> None:
    on_cluster = isinstance(shared_redis_client, RedisClusterClient)
    async with serve_gateway(acks_settings(shared_redis_url, simulator_url, key_prefix)) as gateway:
        assert gateway.app is not None
        store = real_store(gateway.app[STORE])
        assert isinstance(store, RedisStore)
        response = await gateway.client.responses.create(model="sim-1", input="wait for a replica")
        assert response.status == "completed"
        if on_cluster:
            # Read on the replica itself, the moment the client has the response: it has it as completed.
            state_key = KeySpace(key_prefix).response_state(response.id)
            await shared_redis_client.initialize()
            master = shared_redis_client.get_node_from_key(state_key)
            assert master is not None
            primary = aioredis.Redis(host=master.host, port=int(master.port))
            try:
                replication = await primary.info("replication")
            finally:
                await primary.aclose()
            replica = aioredis.Redis(host=replication["slave0"]["ip"], port=int(replication["slave0"]["port"]))
            try:
                await replica.execute_command("READONLY")
                assert await replica.hget(state_key, "status") == b"completed"
            finally:
                await replica.aclose()
        # One wait per response, at its terminal event: met on the cluster, timed out on a node without replicas.
        assert store.replica_ack_shortfalls == (0 if on_cluster else 1)
        streamed = await gateway.client.responses.create(model="sim-1", input="and streamed", stream=True)
        async with streamed:
            kinds = [event.type async for event in streamed]
        assert kinds[-1] == "response.completed"
        assert store.replica_ack_shortfalls == (0 if on_cluster else 2)


def test_replica_acks_need_a_redis_store() -> None:
    with pytest.raises(ConfigError, match="replica_acks"):
        load_settings(storage={"url": "memory://", "replica_acks": 1})
