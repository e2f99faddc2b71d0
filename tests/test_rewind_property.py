"""A property of the event log over a store that fails over to a lagging replica at any moment (hypothesis picks
when the replica stops receiving, when it is promoted, and how emits, flushes and lease renewals interleave with
both): whatever happens, no sequence number is ever stored with an event other than the one published under it,
what was published is contiguous, and the log ends with exactly one terminal event, after everything published.

The writer reacts as ResponseRun does (runs/run.py): once the store says it lost events (LogRewound, from an
append or a renewal), it stops and ends the response `failed` past them; otherwise it ends `completed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runs.event_log import EventLog
from runs.status import TERMINAL_EVENT_TYPES
from storage.base import LogRewound, StoredEvent
from storage.redis import RedisStore
from tests.test_event_log import open_log

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), st.integers(1, 6)),
        st.tuples(st.sampled_from(["flush", "replica_stops", "failover", "renew", "yield"]), st.just(0)),
    ),
    max_size=40,
)


class Published:
    """What clients saw: the events the log handed over once stored."""

    def __init__(self) -> None:
        self.events: dict[int, bytes] = {}
        self.order: list[int] = []

    def begin_writing(self, response_id: str) -> None:
        pass

    def publish(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        for event in events:
            assert event.sequence_number not in self.events, "published twice"
            self.events[event.sequence_number] = event.data
            self.order.append(event.sequence_number)

    def end_writing(self, response_id: str) -> None:
        pass


async def scenario(redis_url: str, operations: list[tuple[str, int]]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client, key_prefix=f"p{uuid.uuid4().hex[:8]}", retention_seconds=60)
    response_id = "resp_property"
    keys = [store.keys.response_state(response_id), store.keys.response_events(response_id)]
    try:
        published = Published()
        log = await open_log(store, response_id, publisher=published)
        published.publish(response_id, await store.read_events(response_id, -1))  # response.created
        item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        await log.emit({"type": "response.output_item.added", "output_index": 0, "item": item})
        await log.emit({"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": part})
        replica: list[bytes] | None = None
        lost = False
        for operation, count in operations:
            if lost:
                break
            try:
                if operation == "emit":
                    for _ in range(count):
                        delta = {"type": "response.output_text.delta", "output_index": 0, "content_index": 0}
                        await log.emit({**delta, "delta": "w "})
                elif operation == "flush":
                    await log.flush()
                elif operation == "replica_stops":
                    replica = [await client.dump(key) for key in keys]
                elif operation == "failover" and replica is not None:
                    for key, dump in zip(keys, replica, strict=True):
                        await client.restore(key, 60_000, dump, replace=True)
                    replica = None
                elif operation == "renew":
                    await store.renew_lease(response_id, log.lease, lease_ms=60_000, stored_through=log.stored_through)
                elif operation == "yield":
                    await asyncio.sleep(0)
            except LogRewound:
                lost = True
        await end(log, lost)
        await check(store, response_id, published)
    finally:
        await client.delete(*keys, store.keys.response_input(response_id))
        await store.close()


async def end(log: EventLog, lost: bool) -> None:
    """As ResponseRun ends: `failed` past a loss it knows of; else `completed`, past a loss its last append finds."""
    if lost:
        with contextlib.suppress(LogRewound):
            await log.flush()
        log.continue_past_loss()
        await emit_terminal(log, "failed")
        await log.flush()
        return
    await emit_terminal(log, "completed")
    try:
        await log.flush()
    except LogRewound:
        log.continue_past_loss()
        await log.flush()
    await log.close()


async def emit_terminal(log: EventLog, status: str) -> None:
    await log.emit({"type": f"response.{status}", "response": {**log.snapshot, "status": status}})


async def check(store: RedisStore, response_id: str, published: Published) -> None:
    stored = await store.read_events(response_id, -1, limit=100_000)
    numbers = [event.sequence_number for event in stored]
    assert numbers == sorted(set(numbers)), f"stored numbers not increasing: {numbers}"
    for event in stored:
        if event.sequence_number in published.events:
            assert published.events[event.sequence_number] == event.data, (
                f"event {event.sequence_number} stored differs from the one published"
            )
    assert published.order == list(range(len(published.order))), f"published with a gap: {published.order}"
    terminals = [event for event in stored if event.type in TERMINAL_EVENT_TYPES]
    assert len(terminals) == 1, f"{len(terminals)} terminal events stored"
    assert terminals[0] is stored[-1], "the terminal event is not last"
    assert published.order[-1] == stored[-1].sequence_number, "the terminal event was not published last"
    record = await store.get_response(response_id)
    assert record is not None
    final: dict[str, Any] = orjson.loads(stored[-1].data)["response"]
    assert record.status == final["status"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_no_number_is_ever_stored_with_another_event_than_the_one_published(
    redis_server: str, operations: list[tuple[str, int]]
) -> None:
    asyncio.run(scenario(redis_server, operations))
