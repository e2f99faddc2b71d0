"""A Redis Cluster master dies while it holds a running response's slot: its replica is promoted, and the response
either goes on or ends with exactly one terminal event; no client ever sees two different events under one
sequence number; a client that reconnects on either instance gets exactly what it missed."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot

from storage.keys import KeySpace
from storage.redis_cluster import ClusterAddress, open_cluster_client
from tests.conftest import GatewayProcess, redis_gateway_env
from tests.helpers import sdk_for
from tests.redis_cluster import RedisCluster
from tests.test_lifecycle_faults import instance

TERMINAL = {"response.completed", "response.failed", "response.incomplete", "response.cancelled"}
# When the master dies: well into the output, well before its end.
KILL_AT_SEQUENCE_NUMBER = 30


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of this test's own: the test kills one of its masters."""
    (tmp_path / "cluster").mkdir()
    cluster = RedisCluster.start(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


async def master_of(cluster: RedisCluster, key: str) -> Any:
    client: RedisClusterClient = open_cluster_client(ClusterAddress.parse(cluster.url), max_connections=4)
    try:
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None
        return next(member for member in cluster.nodes if member.port == int(node.port))
    finally:
        await client.aclose()


@pytest.mark.timeout(120)
async def test_a_master_killed_under_a_running_response(
    own_cluster: RedisCluster,
    start_gateway_process: Callable[..., GatewayProcess],
    simulator_url: str,
    key_prefix: str,
) -> None:
    env = redis_gateway_env(own_cluster.url, simulator_url, key_prefix)
    first, second = start_gateway_process(env), start_gateway_process(env)
    seen: dict[int, dict[str, Any]] = {}
    response_id: str | None = None
    killed = False

    def take(event: dict[str, Any]) -> None:
        number = event["sequence_number"]
        earlier = seen.setdefault(number, event)
        assert earlier == event, ("two different events under one sequence number", number)

    clients = [sdk_for(first.url), sdk_for(second.url)]
    try:
        body = {"sim_tokens": "150", "sim_token_delay_ms": "30"}
        stream = await clients[0].responses.create(
            model="sim-1", input="through a failover", background=True, stream=True, metadata=body
        )
        try:
            async with stream:
                async for event in stream:
                    take(event.model_dump(mode="json"))
                    response_id = response_id or getattr(getattr(event, "response", None), "id", None)
                    if event.sequence_number == KILL_AT_SEQUENCE_NUMBER:
                        assert response_id is not None
                        victim = await master_of(own_cluster, KeySpace(key_prefix).response_state(response_id))
                        assert victim.process is not None
                        victim.process.send_signal(signal.SIGKILL)
                        killed = True
                    if event.type in TERMINAL:
                        break
        except Exception:  # the stream may break while the slot has no master; the client reconnects below
            pass
        assert response_id is not None
        assert killed
        # Reconnect until the response has ended, alternating instances, each time after the last event seen.
        for attempt in range(40):
            if any(event["type"] in TERMINAL for event in seen.values()):
                break
            try:
                resumed = await clients[attempt % 2].responses.retrieve(
                    response_id, stream=True, starting_after=max(seen)
                )
                async with resumed:
                    async for event in resumed:
                        take(event.model_dump(mode="json"))
                        if event.type in TERMINAL:
                            break
            except Exception:  # no master for the slot yet: try the other instance a little later
                await asyncio.sleep(0.2)
        # What the store kept is what the clients saw, read again in one piece from the other instance.
        async with await clients[1].responses.retrieve(response_id, stream=True) as replay:
            replayed = [event.model_dump(mode="json") async for event in replay]
    finally:
        for client in clients:
            await client.close()
    numbers = sorted(seen)
    terminals = [number for number in numbers if seen[number]["type"] in TERMINAL]
    assert terminals == [numbers[-1]], "exactly one terminal event, and it is the last"
    assert numbers == list(range(len(numbers))), "every event seen once, none missing"
    stored = [orjson.dumps(event) for event in replayed]
    streamed = [orjson.dumps(seen[number]) for number in numbers]
    assert stored == streamed


@pytest.mark.timeout(120)
async def test_a_slot_moved_under_a_running_response(
    own_cluster: RedisCluster, simulator_url: str, key_prefix: str
) -> None:
    """The response's slot (its shard: its keys, its shard's run index and queue) moves to another master, a key
    at a time, while it streams: its owner's appends and the other instance's live feed follow ASK, TRYAGAIN and
    then MOVED, and the client sees every event once."""
    async with (
        instance(own_cluster.url, simulator_url, key_prefix) as owner,
        instance(own_cluster.url, simulator_url, key_prefix) as other,
    ):
        created = await owner.client.responses.create(
            model="sim-1",
            input="a slot on the move",
            background=True,
            metadata={"sim_tokens": "120", "sim_token_delay_ms": "25"},
        )
        state_key = KeySpace(key_prefix).response_state(created.id)
        slot = key_slot(state_key.encode())
        before = own_cluster.owner_of(slot)
        seen: dict[int, dict[str, Any]] = {}
        moving: asyncio.Task[Any] | None = None
        async with await other.client.responses.retrieve(created.id, stream=True) as stream:
            async for event in stream:
                dumped = event.model_dump(mode="json")
                assert seen.setdefault(event.sequence_number, dumped) == dumped
                if event.sequence_number == 10:
                    moving = asyncio.create_task(asyncio.to_thread(own_cluster.migrate_slot, slot))
                if event.type in TERMINAL:
                    break
        assert moving is not None
        after = await moving
        assert after.port != before.port
        assert own_cluster.owner_of(slot).port == after.port
        numbers = sorted(seen)
        assert numbers == list(range(len(numbers)))
        assert seen[numbers[-1]]["type"] == "response.completed"
        # Read back from the new owner of the slot, from the first instance: what the client saw.
        async with await owner.client.responses.retrieve(created.id, stream=True) as replay:
            replayed = [event.model_dump(mode="json") async for event in replay]
        assert replayed == [seen[number] for number in numbers]
