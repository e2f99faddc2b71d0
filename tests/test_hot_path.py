"""The hot path's shape, counted rather than timed: what a run writes to Redis per event, that local subscribers are
served without reading their events back, and that a response read mid-run is always the fold of stored events."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.state import STORE
from runs.snapshot import apply_event
from tests.conftest import Gateway

LONG_RESPONSE_DELTAS = 8_000


async def _command_calls(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the server started (commands run inside scripts included)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(fields["calls"]) for name, fields in stats.items()}


async def _bytes_received(client: aioredis.Redis) -> int:
    stats: dict[str, Any] = await client.info("stats")
    return int(stats["total_net_input_bytes"])


async def _stored_events(gateway: Gateway, response_id: str) -> list[bytes]:
    assert gateway.app is not None
    store = gateway.app[STORE]
    events: list[bytes] = []
    while True:
        page = await store.read_events(response_id, len(events) - 1, limit=4096)
        if not page:
            return events
        events += [event.data for event in page]


async def test_a_long_response_writes_about_its_events_bytes_not_a_snapshot_per_event(
    single_node_gateway: Gateway, redis_client: aioredis.Redis
) -> None:
    """8,000 deltas: the snapshot is rewritten only at item boundaries and once the events since the last one add
    up to its size, so what reaches Redis stays within 3x the events themselves (it was ~180x when every append
    rewrote the whole snapshot)."""
    before = await _bytes_received(redis_client)
    response = await single_node_gateway.client.responses.create(
        model="sim-1",
        input="a long one",
        metadata={"sim_tokens": str(LONG_RESPONSE_DELTAS), "sim_token_delay_ms": "0"},
    )
    assert response.status == "completed"
    written = await _bytes_received(redis_client) - before
    events = await _stored_events(single_node_gateway, response.id)
    assert len(events) >= LONG_RESPONSE_DELTAS
    event_bytes = sum(len(data) for data in events)
    assert written <= 3 * event_bytes, (written, event_bytes)


async def test_a_run_costs_at_most_two_redis_commands_per_event_and_no_read_back(
    single_node_gateway: Gateway, redis_client: aioredis.Redis
) -> None:
    """A streamed response on the instance that runs it: each delta is one XADD (scripts only at status changes,
    item boundaries and now and then), and its subscriber gets the events handed over, not read back from Redis
    (no XREAD, no CLIENT UNBLOCK)."""
    before = await _command_calls(redis_client)
    received = 0
    async with single_node_gateway.client.responses.stream(
        model="sim-1", input="count me", metadata={"sim_tokens": "2000", "sim_token_delay_ms": "0"}
    ) as stream:
        async for _ in stream:
            received += 1
    after = await _command_calls(redis_client)
    calls = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    calls.pop("info", None)
    assert received > 2000
    assert "xread" not in calls, calls
    assert "client|unblock" not in calls, calls
    assert sum(calls.values()) <= 2 * received, (sum(calls.values()), received, calls)


async def test_a_response_read_mid_run_is_the_fold_of_a_prefix_of_its_stored_events(gateway: Gateway) -> None:
    """GET while the run writes deltas between snapshots: the body equals the fold of the stored events up to some
    point between what was stored just before the GET and just after it."""
    assert gateway.app is not None
    store = gateway.app[STORE]
    response = await gateway.client.responses.create(
        model="sim-1",
        input="keep going",
        background=True,
        metadata={"sim_tokens": "400", "sim_token_delay_ms": "2"},
    )
    checked = 0
    while True:
        before = len(await _stored_events(gateway, response.id))
        body = (await gateway.http.get(f"/v1/responses/{response.id}")).content
        got = orjson.loads(await body.read())
        events = await _stored_events(gateway, response.id)
        folds: list[dict[str, Any]] = []
        folded: dict[str, Any] = {}
        for index, data in enumerate(events):
            folded = apply_event(folded, orjson.loads(data))
            if index + 1 >= before:
                folds.append(orjson.loads(orjson.dumps(folded)))
        assert got in folds, (got.get("status"), before, len(events))
        checked += 1
        record = await store.get_response(response.id)
        assert record is not None
        if record.status not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.01)
    assert checked > 3
