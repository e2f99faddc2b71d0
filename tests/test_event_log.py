"""The run's event log: numbering, snapshot per write, and coalescing of appends while one is in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from runs.event_log import EventLog, EventPublisher
from runs.snapshot import apply_event
from storage.base import Lease, LeaseLost, NewResponse, ResponseMissing, StoredEvent, StoreUnavailable
from storage.memory import MemoryStore
from storage.redis import RedisStore


class CountingStore(RedisStore):
    """The real Redis store, counting append round trips and making each one take a little longer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.appends: list[int] = []

    async def append_events(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        snapshot: bytes | None,
        status: str,
        lease: Lease,
        **options: bool,
    ) -> bool:
        self.appends.append(len(events))
        await asyncio.sleep(0.01)
        return await super().append_events(
            response_id, events, snapshot=snapshot, status=status, lease=lease, **options
        )


def start_snapshot(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "status": "in_progress", "output": []}


async def stored_log(store: RedisStore, response_id: str) -> tuple[list[int], dict[str, Any]]:
    """The stored events' sequence numbers and their fold, checked equal to the Response the store returns."""
    events = await store.read_events(response_id, -1, limit=10_000)
    replayed: dict[str, Any] = {}
    for event in events:
        replayed = apply_event(replayed, orjson.loads(event.data))
    record = await store.get_response(response_id)
    assert record is not None
    assert orjson.loads(record.snapshot) == replayed
    return [event.sequence_number for event in events], replayed


async def open_log(
    store: RedisStore | MemoryStore, response_id: str, publisher: EventPublisher | None = None
) -> EventLog:
    """A response created in progress, owned here, with its `response.created` stored; and its log from there."""
    snapshot = start_snapshot(response_id)
    created = {"type": "response.created", "response": snapshot, "sequence_number": 0}
    lease = await store.create_response(
        NewResponse(
            response_id=response_id,
            snapshot=orjson.dumps(snapshot),
            status="in_progress",
            background=False,
            stored=True,
            input_items=b"[]",
            events=[StoredEvent(0, "response.created", orjson.dumps(created))],
            owner="me",
            lease_ms=60_000,
        )
    )
    assert lease is not None
    return EventLog(store, response_id, dict(snapshot), next_sequence_number=1, lease=lease, publisher=publisher)


async def test_appends_coalesce_while_one_is_in_flight(redis_server: str, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    store = CountingStore(aioredis.Redis.from_url(redis_server), key_prefix=key_prefix, retention_seconds=60)
    log = await open_log(store, "resp_log")
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    await log.emit({"type": "response.output_item.added", "output_index": 0, "item": item})
    part = {"type": "output_text", "text": "", "annotations": []}
    await log.emit({"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": part})
    for number in range(200):
        delta = {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": f"w{number} "}
        await log.emit(delta)
        if number % 50 == 0:
            await asyncio.sleep(0)  # let the writer start a round trip now and then
    await log.close()

    assert sum(store.appends) == 202
    assert len(store.appends) < 20, store.appends  # 202 events in a handful of round trips
    numbers, replayed = await stored_log(store, "resp_log")
    assert numbers == list(range(203))
    assert replayed["output"][0]["content"][0]["text"] == "".join(f"w{n} " for n in range(200))
    await store.close()


async def test_a_batch_longer_than_the_pending_limit_is_appended_by_the_writer(
    redis_server: str, key_prefix: str
) -> None:
    """A caller that emits with `flush_follows` (the run, flushing after each read from the provider) but whose one
    read holds more events than the log queues: the log appends them itself while the caller waits for room, so
    the caller never waits for a flush only it could make (a provider at full speed sends thousands at once)."""
    import redis.asyncio as aioredis

    from runs.event_log import MAX_PENDING_EVENTS

    store = CountingStore(aioredis.Redis.from_url(redis_server), key_prefix=key_prefix, retention_seconds=60)
    log = await open_log(store, "resp_burst")
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    await log.emit({"type": "response.output_item.added", "output_index": 0, "item": item}, flush_follows=True)
    part = {"type": "output_text", "text": "", "annotations": []}
    part_added = {"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": part}
    await log.emit(part_added, flush_follows=True)
    deltas = MAX_PENDING_EVENTS + 10
    for _ in range(deltas):
        delta = {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "w "}
        await asyncio.wait_for(log.emit(delta, flush_follows=True), 10)
    await log.close()
    numbers, _ = await stored_log(store, "resp_burst")
    assert numbers == list(range(deltas + 3))
    await store.close()


class GatedStore(RedisStore):
    """The real Redis store; the first append of more than one event stops at a gate until cancelled, before or
    after the append has reached Redis (as if its reply were on its way back)."""

    def __init__(self, *args: Any, send_before_gate: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_before_gate = send_before_gate
        self.at_gate = asyncio.Event()
        self.appends: list[list[int]] = []

    async def append_events(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        snapshot: bytes | None,
        status: str,
        lease: Lease,
        **options: bool,
    ) -> bool:
        self.appends.append([event.sequence_number for event in events])
        if len(events) < 2 or self.at_gate.is_set():
            return await super().append_events(
                response_id, events, snapshot=snapshot, status=status, lease=lease, **options
            )
        if self.send_before_gate:
            await super().append_events(response_id, events, snapshot=snapshot, status=status, lease=lease, **options)
        self.at_gate.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("unreachable")


@pytest.mark.parametrize("send_before_gate", [False, True], ids=["cancelled-before-sending", "reply-lost"])
async def test_a_flush_cancelled_mid_append_leaves_its_batch_to_the_writer(
    redis_server: str, key_prefix: str, send_before_gate: bool
) -> None:
    """A run cancelled while its own flush is appending (the run's cancel lands in the consumer): the batch is
    appended again exactly as it was, by the writer or the next flush, whether or not it had reached Redis; the
    log stays contiguous, nothing is stored twice, and the snapshot equals the fold."""
    import redis.asyncio as aioredis

    store = GatedStore(
        aioredis.Redis.from_url(redis_server),
        key_prefix=key_prefix,
        retention_seconds=60,
        send_before_gate=send_before_gate,
    )
    log = await open_log(store, "resp_gate")
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}

    async def consume() -> None:  # as the run's consumer does: emit what arrived together, then flush
        await log.emit({"type": "response.output_item.added", "output_index": 0, "item": item})
        await log.emit({"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": part})
        await log.flush()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(store.at_gate.wait(), 5)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    delta = {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "hi"}
    await log.emit(delta)
    await log.close()

    assert store.appends[0] == store.appends[1] == [1, 2]  # the interrupted batch again, exactly, first
    numbers, replayed = await stored_log(store, "resp_gate")
    assert numbers == [0, 1, 2, 3]
    assert replayed["output"][0]["content"][0]["text"] == "hi"
    await store.close()


class BegunAppendsStore(RedisStore):
    """The real Redis store, recording the appends `flush_soon` begins and those awaited. With `fail_first`, the
    first begun append fails to reach the store: `before-sending` (nothing sent) or `reply-lost` (stored, and its
    reply lost on the way back)."""

    def __init__(self, *args: Any, fail_first: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_first = fail_first
        self.begun: list[list[int]] = []
        self.awaited: list[list[int]] = []

    def start_append(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        lease: Lease,
        done: Callable[[Exception | None], None],
    ) -> bool:
        self.begun.append([event.sequence_number for event in events])
        fail, self.fail_first = self.fail_first, None
        if fail == "before-sending":
            asyncio.get_running_loop().call_soon(done, StoreUnavailable("redis: connection reset"))
            return True
        if fail == "reply-lost":

            def lose_reply(error: Exception | None) -> None:
                assert error is None
                done(StoreUnavailable("redis: connection reset"))

            return super().start_append(response_id, events, lease=lease, done=lose_reply)
        return super().start_append(response_id, events, lease=lease, done=done)

    async def append_events(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        snapshot: bytes | None,
        status: str,
        lease: Lease,
        **options: bool,
    ) -> bool:
        self.awaited.append([event.sequence_number for event in events])
        return await super().append_events(
            response_id, events, snapshot=snapshot, status=status, lease=lease, **options
        )


class Published:
    """An EventPublisher that records the batches it is handed."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def begin_writing(self, response_id: str) -> None:
        pass

    def publish(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        self.batches.append([event.sequence_number for event in events])

    def end_writing(self, response_id: str) -> None:
        pass


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": text}


async def begin_message(log: EventLog) -> None:
    """An output message with an empty text part, stored."""
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    await log.emit({"type": "response.output_item.added", "output_index": 0, "item": item})
    await log.emit({"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": part})
    await log.flush()


async def test_an_append_begun_without_waiting_publishes_once_stored_and_begins_the_next(
    redis_server: str, key_prefix: str
) -> None:
    """The run's way at a model's pace: it begins a delta's append and reads on. Nothing is published before its
    reply; what is emitted meanwhile goes in one next append, begun by that reply; the store's latency metric
    counts each as the append it is."""
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from storage.metrics import StoreMetrics, measured_store

    backend = BegunAppendsStore(aioredis.Redis.from_url(redis_server), key_prefix=key_prefix, retention_seconds=60)
    metrics = StoreMetrics(CollectorRegistry())
    published = Published()
    log = await open_log(measured_store(backend, metrics), "resp_soon", publisher=published)
    await begin_message(log)
    timed_before = sum(metrics.latency.labels("append_events").counts)

    assert log.try_emit(text_delta("a"), flush_follows=True)
    assert log.flush_soon()
    assert published.batches == [[1, 2]]  # not yet: its reply has not come
    for text in "bcd":
        assert log.try_emit(text_delta(text), flush_follows=True)
        assert log.flush_soon()  # one is in flight: these wait for it, and the caller need not
    assert backend.begun == [[3]]
    await log.flush()
    assert backend.begun == [[3], [4, 5, 6]]
    assert published.batches == [[1, 2], [3], [4, 5, 6]]
    assert log.stored_through == 6
    assert sum(metrics.latency.labels("append_events").counts) == timed_before + 2
    await log.close()

    assert backend.awaited == [[1, 2]]
    numbers, replayed = await stored_log(backend, "resp_soon")
    assert numbers == list(range(7))
    assert replayed["output"][0]["content"][0]["text"] == "abcd"
    await backend.close()


@pytest.mark.parametrize("fail_first", ["before-sending", "reply-lost"])
async def test_a_begun_append_that_does_not_reach_the_store_is_appended_again_whole(
    redis_server: str, key_prefix: str, fail_first: str
) -> None:
    """Its connection fails before the append is sent, or after it was stored: the writer appends the same batch
    again, first and exactly, checked (the store may have failed over), and the log stays whole."""
    import redis.asyncio as aioredis

    store = BegunAppendsStore(
        aioredis.Redis.from_url(redis_server), key_prefix=key_prefix, retention_seconds=60, fail_first=fail_first
    )
    published = Published()
    log = await open_log(store, "resp_soon_fails", publisher=published)
    await begin_message(log)
    assert log.try_emit(text_delta("a"), flush_follows=True)
    assert log.try_emit(text_delta("b"), flush_follows=True)
    assert log.flush_soon()
    assert log.try_emit(text_delta("c"), flush_follows=True)
    await log.flush()
    await log.close()

    assert store.begun == [[3, 4]]
    assert store.awaited == [[1, 2], [3, 4], [5]]  # the failed batch again, whole, before what followed it
    assert published.batches == [[1, 2], [3, 4], [5]]
    numbers, replayed = await stored_log(store, "resp_soon_fails")
    assert numbers == list(range(6))
    assert replayed["output"][0]["content"][0]["text"] == "abc"
    await store.close()


async def test_a_begun_append_refused_stops_the_log(redis_server: str, key_prefix: str) -> None:
    """Another instance has claimed the response: the refusal comes with the reply, the log stops, its owner is
    told (lease lost), nothing refused is published, and from then on the caller must await (and meet) it."""
    import redis.asyncio as aioredis

    store = BegunAppendsStore(aioredis.Redis.from_url(redis_server), key_prefix=key_prefix, retention_seconds=60)
    published = Published()
    log = await open_log(store, "resp_soon_fenced", publisher=published)
    lost: list[bool] = []
    log.on_lease_lost = lambda: lost.append(True)
    failed: list[Exception] = []
    log.on_write_failed = failed.append
    await begin_message(log)
    await store.release_lease("resp_soon_fenced", log.lease)
    assert await store.claim_response("resp_soon_fenced", "another", lease_ms=60_000) is not None

    assert log.try_emit(text_delta("a"), flush_follows=True)
    assert log.flush_soon()
    with pytest.raises(LeaseLost):
        await log.flush()
    assert lost == [True]
    assert failed == []  # told as a lost lease, once
    assert published.batches == [[1, 2]]
    assert not log.flush_soon()
    with pytest.raises(LeaseLost):
        log.try_emit(text_delta("b"), flush_follows=True)
    numbers, _ = await stored_log(store, "resp_soon_fenced")
    assert numbers == [0, 1, 2]
    await store.close()


async def test_a_begun_append_refused_while_nobody_waits_is_told_at_once(redis_server: str, key_prefix: str) -> None:
    """The caller began the append and went back to reading its provider, which may stay silent for long: the
    refusal (here: the response was deleted) is told through `on_write_failed` as soon as its reply comes, not at
    the caller's next emit."""
    import redis.asyncio as aioredis

    store = BegunAppendsStore(aioredis.Redis.from_url(redis_server), key_prefix=key_prefix, retention_seconds=60)
    log = await open_log(store, "resp_soon_deleted")
    told = asyncio.get_running_loop().create_future()
    log.on_write_failed = told.set_result
    await begin_message(log)
    await store.delete_response("resp_soon_deleted", only_if_finished=False)

    assert log.try_emit(text_delta("a"), flush_follows=True)
    assert log.flush_soon()
    error = await asyncio.wait_for(told, 10)  # nothing else is emitted or flushed meanwhile
    assert isinstance(error, ResponseMissing)
    assert not log.flush_soon()
    with pytest.raises(ResponseMissing):
        await log.flush()
    await store.close()
