"""One contract suite for every Store backend: the same tests against Redis and the embedded store."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from storage.base import (
    ConversationMissing,
    CursorNotFound,
    DeleteOutcome,
    IdempotencyClaim,
    Lease,
    LeaseLost,
    LogRewound,
    NewResponse,
    NoticeKind,
    OutboxEntry,
    ResponseAlreadyExists,
    ResponseClosed,
    ResponseMissing,
    RunNotice,
    SequenceConflict,
    Store,
    StoredEvent,
)
from storage.keys import idempotency_shard, with_shard
from storage.memory import MemoryStore
from storage.redis import RedisStore


class FakeClock:
    """A clock the embedded store's expiry can be driven with (Redis expiry is tested with real TTLs)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["redis", "cluster", "memory"])
async def store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "redis":
        url = request.getfixturevalue("redis_server")
        backend = RedisStore.from_url(url, key_prefix=key_prefix, retention_seconds=60)
    elif request.param == "cluster":
        # Every script of the store runs here against a real cluster: one whose keys were not all of one slot
        # would fail (CROSSSLOT).
        url = request.getfixturevalue("redis_cluster_url")
        backend = RedisStore.from_url(url, key_prefix=key_prefix, retention_seconds=60)
    else:
        backend = MemoryStore(retention_seconds=60)
    yield backend
    await backend.close()


OWNER = "instance-a"
LEASE = Lease(OWNER, 1, 0)


def event(seq: int, kind: str = "response.output_text.delta") -> StoredEvent:
    return StoredEvent(seq, kind, orjson.dumps({"type": kind, "sequence_number": seq, "delta": f"t{seq}"}))


def new_response(response_id: str, *, events: int = 1, status: str = "in_progress") -> NewResponse:
    return NewResponse(
        response_id=response_id,
        snapshot=b'{"status":"%s"}' % status.encode(),
        status=status,
        background=True,
        stored=True,
        input_items=b"[]",
        events=[event(i, "response.created" if i == 0 else "response.in_progress") for i in range(events)],
        owner=OWNER,
        lease_ms=60_000,
    )


async def test_create_then_read_everything(store: Store) -> None:
    await store.create_response(new_response("resp_a", events=2))
    record = await store.get_response("resp_a")
    assert record is not None
    assert (record.status, record.last_sequence_number, record.background, record.stored) == (
        "in_progress",
        1,
        True,
        True,
    )
    assert [e.sequence_number for e in await store.read_events("resp_a", -1)] == [0, 1]
    assert await store.get_input_items("resp_a") == b"[]"


async def test_a_read_for_another_tenant_finds_nothing(store: Store) -> None:
    await store.create_response(dataclasses.replace(new_response("resp_t"), tenant="a"))
    assert await store.get_response("resp_t", tenant="b") is None
    record = await store.get_response("resp_t", tenant="a")
    assert record is not None
    assert record.tenant == "a"


async def test_redis_reads_nothing_large_of_another_tenants_response(redis_server: str, key_prefix: str) -> None:
    """Another tenant's response is told apart by its tenant field alone: neither its state nor its events are
    read (Lua's commands count in INFO commandstats), so its size shows in no answer's timing."""
    store = RedisStore.from_url(redis_server, key_prefix=key_prefix, retention_seconds=60)
    client = aioredis.Redis.from_url(redis_server)
    try:
        await store.create_response(dataclasses.replace(new_response("resp_big", events=50), tenant="a"))
        await client.config_resetstat()
        assert await store.get_response("resp_big", tenant="b") is None
        stats = await client.info("commandstats")
        assert "cmdstat_hgetall" not in stats
        assert "cmdstat_xrange" not in stats
        assert await store.get_response("resp_big", tenant="a") is not None
        assert "cmdstat_hgetall" in await client.info("commandstats")
    finally:
        await client.aclose()
        await store.close()


async def test_create_twice_is_refused(store: Store) -> None:
    await store.create_response(new_response("resp_dup"))
    with pytest.raises(ResponseAlreadyExists):
        await store.create_response(new_response("resp_dup"))


async def test_append_continues_the_log_and_replaces_the_snapshot(store: Store) -> None:
    await store.create_response(new_response("resp_b", events=2))
    await store.append_events("resp_b", [event(2), event(3)], snapshot=b'{"n":3}', status="in_progress", lease=LEASE)
    events = await store.read_events("resp_b", 1)
    assert [(e.sequence_number, e.type) for e in events] == [
        (2, "response.output_text.delta"),
        (3, "response.output_text.delta"),
    ]
    assert events[0].data == event(2).data  # byte for byte what was appended
    record = await store.get_response("resp_b")
    assert record is not None
    assert (record.snapshot, record.last_sequence_number) == (b'{"n":3}', 3)


@pytest.mark.parametrize("first", [0, 1, 3])
async def test_append_that_does_not_continue_is_refused(store: Store, first: int) -> None:
    await store.create_response(new_response("resp_c", events=2))
    with pytest.raises(SequenceConflict) as refused:
        await store.append_events("resp_c", [event(first)], snapshot=b"{}", status="in_progress", lease=LEASE)
    # A hole before the first event is what a log that lost its last events shows its writer.
    assert isinstance(refused.value, LogRewound) == (first == 3)
    record = await store.get_response("resp_c")
    assert record is not None
    assert record.last_sequence_number == 1
    assert record.snapshot == b'{"status":"in_progress"}'


async def test_append_to_missing_response(store: Store) -> None:
    with pytest.raises(ResponseMissing):
        await store.append_events("resp_none", [event(0)], snapshot=b"{}", status="in_progress", lease=LEASE)


async def test_no_append_after_terminal_status(store: Store) -> None:
    await store.create_response(new_response("resp_d", events=1))
    await store.append_events(
        "resp_d", [event(1, "response.completed")], snapshot=b"{}", status="completed", lease=LEASE
    )
    with pytest.raises(ResponseClosed):
        await store.append_events("resp_d", [event(2)], snapshot=b"{}", status="completed", lease=LEASE)


async def test_read_after_cursor_and_limit(store: Store) -> None:
    await store.create_response(new_response("resp_e", events=1))
    await store.append_events(
        "resp_e", [event(i) for i in range(1, 10)], snapshot=b"{}", status="in_progress", lease=LEASE
    )
    assert [e.sequence_number for e in await store.read_events("resp_e", 4, limit=3)] == [5, 6, 7]
    assert await store.read_events("resp_e", 9) == []
    assert await store.read_events("resp_e", 100) == []
    assert await store.read_events("resp_missing", -1) == []


async def test_concurrent_writers_one_wins(store: Store) -> None:
    await store.create_response(new_response("resp_h", events=1))

    def writer_event(writer: int) -> StoredEvent:
        return StoredEvent(1, "response.output_text.delta", b'{"writer":%d}' % writer)

    results = await asyncio.gather(
        *(
            store.append_events("resp_h", [writer_event(w)], snapshot=b"{}", status="in_progress", lease=LEASE)
            for w in range(10)
        ),
        return_exceptions=True,
    )
    winners = [w for w, result in enumerate(results) if result is False]
    assert len(winners) == 1
    assert all(isinstance(r, SequenceConflict) for r in results if r is not False)
    stored = await store.read_events("resp_h", -1)
    assert [e.sequence_number for e in stored] == [0, 1]
    assert stored[1].data == writer_event(winners[0]).data


async def test_repeating_an_append_is_idempotent(store: Store) -> None:
    """A retry after a lost reply must not fail (nor store twice): the events are already there."""
    await store.create_response(new_response("resp_retry", events=1))
    batch = [event(1), event(2)]
    await store.append_events("resp_retry", batch, snapshot=b"{}", status="in_progress", lease=LEASE)
    await store.append_events("resp_retry", batch, snapshot=b"{}", status="in_progress", lease=LEASE)
    assert [e.sequence_number for e in await store.read_events("resp_retry", -1)] == [0, 1, 2]
    with pytest.raises(SequenceConflict):  # same numbers, other content: a different writer
        await store.append_events(
            "resp_retry", [event(1, "response.other")], snapshot=b"{}", status="in_progress", lease=LEASE
        )
    closing = [event(3, "response.completed")]
    await store.append_events("resp_retry", closing, snapshot=b"{}", status="completed", lease=LEASE)
    await store.append_events("resp_retry", closing, snapshot=b"{}", status="completed", lease=LEASE)


async def test_webhooks_owed_enter_the_outbox_only_with_a_stored_terminal_event(store: Store) -> None:
    await store.create_response(new_response("resp_wh", events=1))
    owed = [OutboxEntry("resp_wh", b'{"endpoint":"a"}'), OutboxEntry("resp_wh", b'{"endpoint":"b"}')]
    # Not with an append that does not end the response, nor with a terminal one that is refused.
    await store.append_events("resp_wh", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE, outbox=owed)
    with pytest.raises(SequenceConflict):
        await store.append_events(
            "resp_wh", [event(5, "response.completed")], snapshot=b"{}", status="completed", lease=LEASE, outbox=owed
        )
    assert await store.due_webhooks(10, claim_ms=0) == []
    closing = [event(2, "response.completed")]
    await store.append_events("resp_wh", closing, snapshot=b"{}", status="completed", lease=LEASE, outbox=owed)
    # A retry of that append (its reply lost) owes nothing more.
    await store.append_events("resp_wh", closing, snapshot=b"{}", status="completed", lease=LEASE, outbox=owed)
    due = await store.due_webhooks(10, claim_ms=60_000)
    assert sorted(entry.payload for entry in due) == [b'{"endpoint":"a"}', b'{"endpoint":"b"}']
    assert await store.due_webhooks(10, claim_ms=60_000) == []  # claimed: no other sender takes them meanwhile
    await store.retry_webhook(owed[0], delay_ms=60_000)
    await store.retry_webhook(owed[1], delay_ms=0)
    assert await store.due_webhooks(10, claim_ms=60_000) == [owed[1]]
    await store.webhook_done(owed[1])
    await store.retry_webhook(owed[1], delay_ms=0)
    assert await store.due_webhooks(10, claim_ms=60_000) == []


async def test_more_webhooks_due_than_a_sender_takes_stay_due_for_the_next(store: Store) -> None:
    owed = []
    for shard in range(0, 40, 4):  # ten responses, each in a shard of its own
        response_id = with_shard("resp_whmany_00", shard)
        await store.create_response(new_response(response_id, events=1))
        entry = OutboxEntry(response_id, b'{"endpoint":"a"}')
        owed.append(entry)
        closing = [event(1, "response.completed")]
        await store.append_events(response_id, closing, snapshot=b"{}", status="completed", lease=LEASE, outbox=[entry])
    taken: list[OutboxEntry] = []
    for _ in range(5):
        batch = await store.due_webhooks(2, claim_ms=60_000)
        assert len(batch) == 2
        taken += batch
    assert sorted(taken, key=lambda entry: entry.response_id) == sorted(owed, key=lambda entry: entry.response_id)
    assert await store.due_webhooks(2, claim_ms=60_000) == []


async def test_append_reports_a_requested_cancel(store: Store) -> None:
    await store.create_response(new_response("resp_cx", events=1))
    assert await store.append_events("resp_cx", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE) is False
    await store.request_cancel("resp_cx")
    assert await store.append_events("resp_cx", [event(2)], snapshot=b"{}", status="in_progress", lease=LEASE) is True


async def test_delete_removes_everything_once_finished(store: Store) -> None:
    await store.create_response(new_response("resp_i", events=3))
    assert await store.delete_response("resp_i") is DeleteOutcome.ACTIVE
    assert await store.get_response("resp_i") is not None
    await store.append_events(
        "resp_i", [event(3, "response.completed")], snapshot=b"{}", status="completed", lease=LEASE
    )
    assert await store.delete_response("resp_i") is DeleteOutcome.DELETED
    assert await store.get_response("resp_i") is None
    assert await store.read_events("resp_i", -1) == []
    assert await store.get_input_items("resp_i") is None
    assert await store.delete_response("resp_i") is DeleteOutcome.MISSING


async def test_delete_of_a_running_response_when_forced(store: Store) -> None:
    await store.create_response(new_response("resp_force", events=2))
    assert await store.delete_response("resp_force", only_if_finished=False) is DeleteOutcome.DELETED
    assert await store.get_response("resp_force") is None


async def test_cancel_request_reaches_listeners_and_reports_status(store: Store) -> None:
    await store.create_response(new_response("resp_run", events=1))
    await store.create_response(new_response("resp_done", events=1))
    await store.append_events(
        "resp_done", [event(1, "response.completed")], snapshot=b"{}", status="completed", lease=LEASE
    )
    assert await store.request_cancel("resp_done") == "completed"
    assert await store.request_cancel("resp_missing") is None
    notices = store.run_notices()
    first = asyncio.ensure_future(anext(notices))
    try:
        # The listener subscribes in the background; ask until it hears (a notice before that is not kept).
        for _ in range(100):
            assert await store.request_cancel("resp_run") == "in_progress"
            done, _ = await asyncio.wait({first}, timeout=0.05)
            if done:
                break
        assert first.result() == RunNotice(NoticeKind.CANCEL, "resp_run")
    finally:
        first.cancel()
        await notices.aclose()


async def test_a_queued_response_is_announced_to_every_instance(store: Store) -> None:
    """Announcing a queued response tells every listener, so that an instance with a free slot starts it now;
    creating one (queued or not) announces nothing by itself (its admission is not complete yet)."""
    notices = store.run_notices()
    first = asyncio.ensure_future(anext(notices))
    try:
        for attempt in range(100):  # as above: until the listener has subscribed
            await store.create_response(dataclasses.replace(new_response(f"resp_queued{attempt}"), owner=""))
            await store.create_response(new_response(f"resp_mine{attempt}"))
            await store.announce_queued(f"resp_owned{attempt}")
            done, _ = await asyncio.wait({first}, timeout=0.05)
            if done:
                break
        notice = first.result()
        assert notice.kind is NoticeKind.QUEUED, notice
        assert notice.response_id.startswith("resp_owned"), notice
        heard = [notice]
        while True:
            try:
                heard.append(await asyncio.wait_for(anext(notices), 0.2))
            except TimeoutError:
                break
        assert all(n.kind is NoticeKind.QUEUED and n.response_id.startswith("resp_owned") for n in heard), heard
    finally:
        first.cancel()
        await notices.aclose()


async def test_event_feed_reads_many_responses_at_once(store: Store) -> None:
    for name in ("resp_x", "resp_y", "resp_z"):
        await store.create_response(new_response(name, events=1))
    feed = store.open_event_feed()
    try:
        assert await feed.read({"resp_x": 0, "resp_y": 0}, wait_ms=50) == {}
        await store.append_events("resp_y", [event(1), event(2)], snapshot=b"{}", status="in_progress", lease=LEASE)
        await store.append_events("resp_z", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE)
        found = await feed.read({"resp_x": 0, "resp_y": 0, "resp_z": 0}, wait_ms=1000)
        assert {rid: [e.sequence_number for e in events] for rid, events in found.items()} == {
            "resp_y": [1, 2],
            "resp_z": [1],
        }
        waiting = asyncio.ensure_future(feed.read({"resp_x": 0}, wait_ms=5000))
        await asyncio.sleep(0.05)
        await store.append_events("resp_x", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE)
        assert [e.sequence_number for e in (await asyncio.wait_for(waiting, 2))["resp_x"]] == [1]
    finally:
        await feed.close()


async def test_event_feed_interrupt_ends_a_blocked_read(store: Store) -> None:
    await store.create_response(new_response("resp_w", events=1))
    feed = store.open_event_feed()
    try:
        blocked = asyncio.ensure_future(feed.read({"resp_w": 0}, wait_ms=10_000))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        await feed.interrupt()
        # Well under the Redis feed's 1 s block cap: a read that merely ran out must not pass for an interrupted one.
        assert await asyncio.wait_for(blocked, 0.5) == {}
    finally:
        await feed.close()


async def test_idempotency_claim_has_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(
            store.claim_idempotency_key("tenant", "key-1", fingerprint="f", response_id=f"resp_{n}", ttl_seconds=60)
            for n in range(20)
        )
    )
    winners = [n for n, result in enumerate(results) if result is None]
    assert len(winners) == 1
    assert {result.response_id for result in results if result is not None} == {f"resp_{winners[0]}"}
    assert {result.fingerprint for result in results if result is not None} == {"f"}


async def test_idempotency_claims_are_scoped(store: Store) -> None:
    assert await store.claim_idempotency_key("a", "k", fingerprint="f", response_id="resp_a", ttl_seconds=60) is None
    assert await store.claim_idempotency_key("b", "k", fingerprint="f", response_id="resp_b", ttl_seconds=60) is None
    held = await store.claim_idempotency_key("a", "k", fingerprint="g", response_id="resp_c", ttl_seconds=60)
    assert held is not None
    assert held.response_id == "resp_a"


async def test_idempotency_release_and_replace_only_their_own_claim(store: Store) -> None:
    await store.claim_idempotency_key("t", "k", fingerprint="f", response_id="resp_1", ttl_seconds=60)
    await store.release_idempotency_key("t", "k", response_id="resp_other")
    held = await store.claim_idempotency_key("t", "k", fingerprint="f", response_id="resp_2", ttl_seconds=60)
    assert held is not None
    assert held.response_id == "resp_1"
    replacement = IdempotencyClaim("f", "resp_3", 0)
    assert not await store.replace_idempotency_claim(
        "t", "k", expected_response_id="resp_other", claim=replacement, ttl_seconds=60
    )
    assert await store.replace_idempotency_claim(
        "t", "k", expected_response_id="resp_1", claim=replacement, ttl_seconds=60
    )
    held = await store.claim_idempotency_key("t", "k", fingerprint="f", response_id="resp_4", ttl_seconds=60)
    assert held is not None
    assert held.response_id == "resp_3"
    await store.release_idempotency_key("t", "k", response_id="resp_3")
    assert await store.claim_idempotency_key("t", "k", fingerprint="f", response_id="resp_5", ttl_seconds=60) is None


async def test_redis_idempotency_key_has_its_ttl_and_hides_the_client_key(
    redis_server: str, key_prefix: str, redis_client: aioredis.Redis
) -> None:
    store = RedisStore.from_url(redis_server, key_prefix=key_prefix, retention_seconds=60)
    try:
        await store.claim_idempotency_key("t", "my-secret-key", fingerprint="f", response_id="r", ttl_seconds=30)
        keys = [key async for key in redis_client.scan_iter(match=f"{key_prefix}:*")]
        assert len(keys) == 1
        assert b"my-secret-key" not in keys[0]
        assert 0 < await redis_client.pttl(keys[0]) <= 30_000
        await store.create_response(
            NewResponse(**vars_of(new_response("r", events=1)) | {"idempotency": ("t", "my-secret-key")})
        )
        assert await store.settle_response("r", idempotency_ttl_seconds=50) is False  # not ended: untouched
        assert 0 < await redis_client.pttl(keys[0]) <= 30_000
        await store.append_events(
            "r", [event(1, "response.completed")], snapshot=b"{}", status="completed", lease=LEASE
        )
        assert await store.settle_response("r", idempotency_ttl_seconds=50) is True
        assert 30_000 < await redis_client.pttl(keys[0]) <= 50_000
        names = [key async for key in redis_client.scan_iter(match=f"{key_prefix}:*")]
        assert all(b"my-secret-key" not in name for name in names)
        for state in await _hashes(redis_client, key_prefix):
            assert b"my-secret-key" not in b"".join(await redis_client.hvals(state))
    finally:
        await store.close()


def items(*names: str) -> list[tuple[str, bytes]]:
    return [(name, b'{"id":"%s"}' % name.encode()) for name in names]


async def test_conversation_create_read_and_metadata(store: Store) -> None:
    await store.create_conversation("conv_a", created_at=123, metadata=b'{"k":"v"}', items=items("i1", "i2"))
    with pytest.raises(ResponseAlreadyExists):
        await store.create_conversation("conv_a", created_at=1, metadata=b"{}", items=[])
    record = await store.get_conversation("conv_a")
    assert record is not None
    assert (record.created_at, record.metadata, record.active_response_id) == (123, b'{"k":"v"}', None)
    await store.set_conversation_metadata("conv_a", b'{"k":"w"}')
    record = await store.get_conversation("conv_a")
    assert record is not None
    assert record.metadata == b'{"k":"w"}'
    with pytest.raises(ConversationMissing):
        await store.set_conversation_metadata("conv_none", b"{}")
    assert await store.get_conversation("conv_none") is None


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_conversation_items_page_in_both_orders(store: Store, order: str) -> None:
    names = [f"i{n}" for n in range(7)]
    await store.create_conversation("conv_p", created_at=1, metadata=b"{}", items=items(*names[:3]))
    assert await store.append_conversation_items("conv_p", items(*names[3:])) is None
    expected = names if order == "asc" else list(reversed(names))
    walked: list[bytes] = []
    after = None
    while True:
        page, more = await store.list_conversation_items("conv_p", after=after, limit=3, order=order)
        walked += page
        if not more:
            break
        after = orjson.loads(page[-1])["id"]
    assert [orjson.loads(item)["id"] for item in walked] == expected
    with pytest.raises(CursorNotFound):
        await store.list_conversation_items("conv_p", after="nope", limit=3, order=order)


async def test_conversation_item_get_and_delete(store: Store) -> None:
    await store.create_conversation("conv_i", created_at=1, metadata=b"{}", items=items("a", "b", "c"))
    assert await store.get_conversation_item("conv_i", "b") == b'{"id":"b"}'
    assert await store.delete_conversation_item("conv_i", "b") is True
    assert await store.delete_conversation_item("conv_i", "b") is False
    assert await store.get_conversation_item("conv_i", "b") is None
    page, _ = await store.list_conversation_items("conv_i", after=None, limit=10, order="asc")
    assert page == [b'{"id":"a"}', b'{"id":"c"}']
    assert await store.delete_conversation("conv_i") is True
    assert await store.get_conversation("conv_i") is None
    assert await store.delete_conversation("conv_i") is False


async def test_an_item_id_already_in_the_conversation_is_updated_in_place(store: Store) -> None:
    await store.create_conversation("conv_dup", created_at=1, metadata=b"{}", items=items("a", "b"))
    assert await store.append_conversation_items("conv_dup", [("a", b'{"id":"a","v":2}'), ("c", b'{"id":"c"}')]) is None
    page, _ = await store.list_conversation_items("conv_dup", after=None, limit=10, order="asc")
    assert page == [b'{"id":"a","v":2}', b'{"id":"b"}', b'{"id":"c"}']
    assert await store.delete_conversation_item("conv_dup", "a") is True
    page, _ = await store.list_conversation_items("conv_dup", after=None, limit=10, order="asc")
    assert page == [b'{"id":"b"}', b'{"id":"c"}']


async def test_conversation_turns_have_one_holder(store: Store) -> None:
    await store.create_conversation("conv_t", created_at=1, metadata=b"{}", items=items("u0"))
    holders = await asyncio.gather(*(store.begin_conversation_turn("conv_t", f"resp_{n}") for n in range(10)))
    winners = [n for n, holder in enumerate(holders) if holder is None]
    assert len(winners) == 1
    winner = f"resp_{winners[0]}"
    assert {holder for holder in holders if holder is not None} == {winner}
    assert await store.append_conversation_items("conv_t", items("x")) == winner  # refused while busy
    assert await store.end_conversation_turn("conv_t", "resp_other", completed=True, items=items("z")) is False
    assert await store.end_conversation_turn("conv_t", winner, completed=True, items=items("in1", "out1")) is True
    record = await store.get_conversation("conv_t")
    assert record is not None
    assert (record.active_response_id, record.latest_completed_response_id) == (None, winner)
    page, _ = await store.list_conversation_items("conv_t", after=None, limit=10, order="asc")
    assert [orjson.loads(item)["id"] for item in page] == ["u0", "in1", "out1"]


async def test_a_turn_that_did_not_complete_adds_what_it_is_given_and_a_dead_holder_can_be_cleared(
    store: Store,
) -> None:
    await store.create_conversation("conv_f", created_at=1, metadata=b"{}", items=[])
    assert await store.begin_conversation_turn("conv_f", "resp_1") is None
    assert await store.end_conversation_turn("conv_f", "resp_1", completed=False, items=[]) is True  # a failed one
    record = await store.get_conversation("conv_f")
    assert record is not None
    assert (record.active_response_id, record.latest_completed_response_id) == (None, None)
    assert (await store.list_conversation_items("conv_f", after=None, limit=10, order="asc"))[0] == []
    assert await store.begin_conversation_turn("conv_f", "resp_cut") is None
    # An incomplete one: its items join, but it is not the latest completed response.
    assert await store.end_conversation_turn("conv_f", "resp_cut", completed=False, items=items("cut")) is True
    record = await store.get_conversation("conv_f")
    assert record is not None
    assert (record.active_response_id, record.latest_completed_response_id) == (None, None)
    page, _ = await store.list_conversation_items("conv_f", after=None, limit=10, order="asc")
    assert [orjson.loads(item)["id"] for item in page] == ["cut"]
    assert await store.begin_conversation_turn("conv_f", "resp_2") is None
    assert await store.clear_conversation_turn("conv_f", "resp_other") is False
    assert await store.clear_conversation_turn("conv_f", "resp_2") is True
    assert await store.begin_conversation_turn("conv_f", "resp_3") is None
    with pytest.raises(ConversationMissing):
        await store.begin_conversation_turn("conv_none", "resp_4")


async def test_redis_conversation_keys_have_the_ttl(
    redis_server: str, key_prefix: str, redis_client: aioredis.Redis
) -> None:
    store = RedisStore.from_url(redis_server, key_prefix=key_prefix, retention_seconds=60)
    try:
        await store.create_conversation("conv_ttl", created_at=1, metadata=b"{}", items=items("a"))
        await store.begin_conversation_turn("conv_ttl", "resp_1")
        await store.end_conversation_turn("conv_ttl", "resp_1", completed=True, items=items("b"))
        keys = [key async for key in redis_client.scan_iter(match=f"{key_prefix}:*")]
        assert len(keys) == 3
        for key in keys:
            assert b"{conv_ttl}" in key
            assert 0 < await redis_client.pttl(key) <= 60_000
    finally:
        await store.close()


async def test_only_the_lease_holder_may_append(store: Store) -> None:
    await store.create_response(new_response("resp_lease", events=1))
    for stranger in (Lease("instance-b", 1, 0), Lease(OWNER, 2, 0)):
        with pytest.raises(LeaseLost):
            await store.append_events("resp_lease", [event(1)], snapshot=b"{}", status="in_progress", lease=stranger)
    await store.append_events("resp_lease", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE)


async def test_an_expired_lease_is_fenced_and_claimed_with_a_new_epoch(store: Store) -> None:
    created = new_response("resp_exp_lease", events=1)
    lease = await store.create_response(
        NewResponse(
            response_id=created.response_id,
            snapshot=created.snapshot,
            status=created.status,
            background=True,
            stored=True,
            input_items=b"[]",
            events=created.events,
            owner=OWNER,
            lease_ms=150,
        )
    )
    assert lease is not None
    assert await store.claim_response("resp_exp_lease", "instance-b", lease_ms=60_000) is None  # still held
    renewed = await store.renew_lease("resp_exp_lease", lease, lease_ms=150)
    assert renewed.lease.until_ms >= lease.until_ms
    assert renewed.cancel_requested is False
    await asyncio.sleep(0.25)
    with pytest.raises(LeaseLost):  # expired: even the old owner may not write, nor renew
        await store.append_events("resp_exp_lease", [event(1)], snapshot=b"{}", status="in_progress", lease=lease)
    with pytest.raises(LeaseLost):
        await store.renew_lease("resp_exp_lease", lease, lease_ms=150)
    claimed = await store.claim_response("resp_exp_lease", "instance-b", lease_ms=60_000)
    assert claimed is not None
    new_lease, recoveries = claimed
    assert (new_lease.owner, recoveries) == ("instance-b", 1)
    assert new_lease.epoch > lease.epoch
    with pytest.raises(LeaseLost):
        await store.append_events("resp_exp_lease", [event(1)], snapshot=b"{}", status="in_progress", lease=lease)
    await store.append_events("resp_exp_lease", [event(1)], snapshot=b"{}", status="in_progress", lease=new_lease)
    record = await store.get_response("resp_exp_lease")
    assert record is not None
    assert (record.owner, record.recovery_count) == ("instance-b", 1)


async def test_released_and_queued_responses_are_claimable_at_once(store: Store) -> None:
    lease = await store.create_response(new_response("resp_rel", events=1))
    assert lease is not None
    await store.release_lease("resp_rel", lease)
    assert await store.claim_response("resp_rel", "instance-b", lease_ms=60_000) is not None
    assert (
        await store.create_response(NewResponse(**vars_of(new_response("resp_queued", events=1)) | {"owner": ""}))
        is None
    )
    claimed = await store.claim_response("resp_queued", "instance-c", lease_ms=60_000)
    assert claimed is not None
    assert claimed[1] == 0  # starting a queued response is not a recovery
    await store.append_events(
        "resp_queued", [event(1, "response.completed")], snapshot=b"{}", status="completed", lease=claimed[0]
    )
    assert await store.claim_response("resp_queued", "instance-d", lease_ms=60_000) is None  # finished


async def test_renewing_the_lease_of_a_finished_response_is_not_a_loss(store: Store) -> None:
    lease = await store.create_response(new_response("resp_done_lease", events=1))
    assert lease is not None
    closing = [event(1, "response.completed")]
    await store.append_events("resp_done_lease", closing, snapshot=b"{}", status="completed", lease=lease)
    assert (await store.renew_lease("resp_done_lease", lease, lease_ms=1000)).lease == lease


def vars_of(new: NewResponse) -> dict[str, object]:
    return {name: getattr(new, name) for name in new.__dataclass_fields__}


def queued_response(response_id: str) -> NewResponse:
    return NewResponse(**vars_of(new_response(response_id, events=2, status="queued")) | {"owner": ""})


async def _hashes(client: aioredis.Redis, key_prefix: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"{key_prefix}:*:state")]


async def test_admission_indexes_or_queues_in_the_same_step(store: Store) -> None:
    lease = await store.create_response(new_response("resp_owned", events=1))
    assert lease is not None
    for name in ("resp_q1", "resp_q2", "resp_q3"):
        assert await store.create_response(queued_response(name)) is None
    assert await store.queued_runs(10) == ["resp_q1", "resp_q2", "resp_q3"]  # admission order, not id order
    assert await store.queued_runs(2) == ["resp_q1", "resp_q2"]
    assert await store.due_runs(10) == []  # the owned one is due when its lease expires, not before
    await store.release_lease("resp_owned", lease)
    assert await store.due_runs(10) == ["resp_owned"]  # released: due at once


async def test_claiming_a_queued_response_moves_it_from_the_queue_to_the_run_index(store: Store) -> None:
    await store.create_response(queued_response("resp_qa"))
    await store.create_response(queued_response("resp_qb"))
    claimed = await store.claim_response("resp_qb", "instance-b", lease_ms=500)
    assert claimed is not None
    assert await store.queued_runs(10) == ["resp_qa"]
    assert await store.claim_response("resp_qb", "instance-c", lease_ms=500) is None  # held now
    await asyncio.sleep(0.6)
    assert await store.due_runs(10) == ["resp_qb"]  # its new owner's lease lapsed: an orphan


async def test_renewal_reports_a_cancel_request(store: Store) -> None:
    lease = await store.create_response(new_response("resp_rc", events=1))
    assert lease is not None
    assert await store.request_cancel("resp_rc") == "in_progress"
    renewal = await store.renew_lease("resp_rc", lease, lease_ms=60_000)
    assert renewal.cancel_requested is True
    record = await store.get_response("resp_rc")
    assert record is not None
    assert record.cancel_requested is True


async def test_settling_needs_a_stored_end_and_drops_the_index_entry(store: Store) -> None:
    lease = await store.create_response(new_response("resp_settle", events=1))
    assert lease is not None
    await store.release_lease("resp_settle", lease)
    assert await store.settle_response("resp_settle", idempotency_ttl_seconds=60) is False
    assert await store.due_runs(10) == ["resp_settle"]  # still indexed: its end is not stored
    claimed = await store.claim_response("resp_settle", "instance-b", lease_ms=60_000)
    assert claimed is not None
    await store.append_events(
        "resp_settle", [event(1, "response.failed")], snapshot=b"{}", status="failed", lease=claimed[0]
    )
    await store.release_lease("resp_settle", claimed[0])  # a finished response's lease is not released
    assert await store.settle_response("resp_settle", idempotency_ttl_seconds=60) is True
    assert await store.due_runs(10) == []
    assert await store.settle_response("resp_never_was", idempotency_ttl_seconds=60) is True  # gone: nothing left


async def test_an_abandoned_admission_leaves_nothing(store: Store) -> None:
    keyed = with_shard("resp_ab00", idempotency_shard("t", "k"))  # as admission makes a keyed response's id
    await store.create_conversation("conv_ab", created_at=1, metadata=b"{}", items=[])
    assert await store.claim_idempotency_key("t", "k", fingerprint="f", response_id=keyed, ttl_seconds=60) is None
    await store.create_response(
        NewResponse(**vars_of(queued_response(keyed)) | {"idempotency": ("t", "k"), "conversation_id": "conv_ab"})
    )
    assert await store.begin_conversation_turn("conv_ab", keyed) is None
    assert await store.begin_conversation_turn("conv_ab", keyed) is None  # its own turn again: a no-op
    await store.abandon_admission(keyed, idempotency=("t", "k"), conversation_id="conv_ab")
    assert await store.get_response(keyed) is None
    assert await store.queued_runs(10) == []
    conversation = await store.get_conversation("conv_ab")
    assert conversation is not None
    assert conversation.active_response_id is None
    assert await store.claim_idempotency_key("t", "k", fingerprint="f", response_id="resp_2", ttl_seconds=60) is None
    # An undo never takes what another response holds.
    assert await store.begin_conversation_turn("conv_ab", "resp_other") is None
    await store.abandon_admission(keyed, idempotency=("t", "k"), conversation_id="conv_ab")
    held = await store.claim_idempotency_key("t", "k", fingerprint="f", response_id="resp_3", ttl_seconds=60)
    assert held is not None
    assert held.response_id == "resp_2"
    conversation = await store.get_conversation("conv_ab")
    assert conversation is not None
    assert conversation.active_response_id == "resp_other"


async def test_deleting_a_response_drops_its_queue_entry(store: Store) -> None:
    await store.create_response(queued_response("resp_del_q"))
    assert await store.delete_response("resp_del_q", only_if_finished=False) is DeleteOutcome.DELETED
    assert await store.queued_runs(10) == []


async def test_redis_every_key_has_the_retention_ttl(redis_server: str, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server, key_prefix=key_prefix, retention_seconds=60)
    client = aioredis.Redis.from_url(redis_server)
    try:
        await store.create_response(new_response("resp_ttl", events=2))
        await store.append_events("resp_ttl", [event(2)], snapshot=b"{}", status="in_progress", lease=LEASE)
        await store.create_response(queued_response("resp_ttl_q"))
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*")]
        assert len(keys) == 8  # two responses' three keys, the run index and the queue
        for key in keys:
            assert 0 < await client.pttl(key) <= 60_000, key
        response_keys = [key for key in keys if b":resp_ttl:" in key]
        assert len(response_keys) == 3
        # One Cluster slot for the response's keys and its shard's index: every script of its life touches one.
        assert {key_slot(key) for key in [*response_keys, store.keys.response_index("resp_ttl")[0].encode()]} == {
            key_slot(response_keys[0])
        }
    finally:
        await client.aclose()
        await store.close()


async def test_redis_retention_expires_everything(redis_server: str, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server, key_prefix=key_prefix, retention_seconds=1)
    client = aioredis.Redis.from_url(redis_server)
    try:
        await store.create_response(new_response("resp_exp", events=2))
        await asyncio.sleep(1.2)
        assert [key async for key in client.scan_iter(match=f"{key_prefix}:*")] == []
        assert await store.get_response("resp_exp") is None
    finally:
        await client.aclose()
        await store.close()


async def test_memory_retention_expires_everything() -> None:
    clock = FakeClock()
    store = MemoryStore(retention_seconds=10, clock=clock)
    await store.create_response(new_response("resp_m", events=1))
    clock.now += 5
    await store.append_events("resp_m", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE)
    clock.now += 9  # 14 s after creation, 9 s after the last write: still kept
    assert await store.get_response("resp_m") is not None
    clock.now += 2
    assert await store.get_response("resp_m") is None
    assert await store.read_events("resp_m", -1) == []


async def test_an_expired_queued_response_never_blocks_the_queue(redis_server: str, key_prefix: str) -> None:
    """The queue is an index, not the truth: a member whose response expired is dropped when claimed."""
    clock = FakeClock()
    memory = MemoryStore(retention_seconds=10, clock=clock)
    redis_store = RedisStore.from_url(redis_server, key_prefix=key_prefix, retention_seconds=60)
    try:
        for store in (memory, redis_store):
            await store.create_response(queued_response("resp_expired"))
            await store.create_response(queued_response("resp_next"))
        clock.now += 11
        await memory.create_response(queued_response("resp_next"))  # the first one expired meanwhile
        await redis_store._client.delete(redis_store.keys.response_state("resp_expired"))
        for store in (memory, redis_store):
            assert await store.claim_response("resp_expired", "instance-b", lease_ms=1000) is None
            assert await store.queued_runs(10) == ["resp_next"]
    finally:
        await redis_store.close()


# -- snapshotless appends (the hot path: a delta is one plain write, fenced by its entry id in Redis) -------


def delta(seq: int, text: str) -> StoredEvent:
    data = {"type": "response.output_text.delta", "sequence_number": seq, "output_index": 0, "content_index": 0}
    return StoredEvent(seq, "response.output_text.delta", orjson.dumps({**data, "delta": text}))


def text_response(response_id: str) -> NewResponse:
    """A response whose snapshot has one text part, so folded deltas show in it."""
    snapshot = {"status": "in_progress", "output": [{"type": "message", "content": [{"type": "output_text"}]}]}
    return NewResponse(
        response_id=response_id,
        snapshot=orjson.dumps(snapshot),
        status="in_progress",
        background=True,
        stored=True,
        input_items=b"[]",
        events=[event(0, "response.created")],
        owner=OWNER,
        lease_ms=60_000,
    )


def text_of(snapshot: bytes) -> str:
    text: str = orjson.loads(snapshot)["output"][0]["content"][0].get("text", "")
    return text


async def test_a_response_is_its_snapshot_with_the_later_events_folded_in(store: Store) -> None:
    lease = await store.create_response(text_response("resp_fold"))
    assert lease is not None
    assert (
        await store.append_events("resp_fold", [delta(1, "a"), delta(2, "b")], snapshot=None, status="", lease=lease)
        is False
    )
    record = await store.get_response("resp_fold")
    assert record is not None
    assert (text_of(record.snapshot), record.last_sequence_number) == ("ab", 2)
    await store.append_events("resp_fold", [delta(3, "c")], snapshot=record.snapshot, status="in_progress", lease=lease)
    await store.append_events("resp_fold", [delta(4, "d")], snapshot=None, status="", lease=lease)
    record = await store.get_response("resp_fold")
    assert record is not None
    # The snapshot given with seq 3 is what seq 2 left ("ab"): the store trusts it, and folds only seq 4 onto it.
    assert (text_of(record.snapshot), record.last_sequence_number) == ("abd", 4)
    assert [e.sequence_number for e in await store.read_events("resp_fold", 2)] == [3, 4]


async def test_begins_appends_says_what_start_append_does(store: Store, request: pytest.FixtureRequest) -> None:
    """Writers trust `begins_appends` and stop offering batches to a store that says False: such a store must
    decline every one (nothing written), and one that says True must begin it and report it stored in `done`,
    later, never within the call. Only the single node begins appends (its mux hands replies to a callback)."""
    assert store.begins_appends is (request.node.callspec.params["store"] == "redis")
    lease = await store.create_response(text_response("resp_begun"))
    assert lease is not None
    heard: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    begun = store.start_append("resp_begun", [delta(1, "a")], lease=lease, done=heard.set_result)
    assert begun is store.begins_appends
    assert not heard.done()  # never within the call
    if begun:
        assert await asyncio.wait_for(heard, 5) is None
    stored = [event.sequence_number for event in await store.read_events("resp_begun", -1)]
    assert stored == ([0, 1] if begun else [0])


async def test_a_snapshotless_append_is_fenced_once_another_instance_claims_the_response(store: Store) -> None:
    created = text_response("resp_fence")
    lease = await store.create_response(dataclasses.replace(created, lease_ms=100))
    assert lease is not None
    await store.append_events("resp_fence", [delta(1, "a")], snapshot=None, status="", lease=lease)
    await asyncio.sleep(0.15)
    # Expired but not claimed: nobody else can have written, so the owner's delta is still taken.
    await store.append_events("resp_fence", [delta(2, "b")], snapshot=None, status="", lease=lease)
    claimed = await store.claim_response("resp_fence", "instance-b", lease_ms=60_000)
    assert claimed is not None
    new_lease, _ = claimed
    with pytest.raises(LeaseLost):
        await store.append_events("resp_fence", [delta(3, "late")], snapshot=None, status="", lease=lease)
    await store.append_events("resp_fence", [delta(3, "c"), delta(4, "d")], snapshot=None, status="", lease=new_lease)
    # Reading after a cursor works across the epochs the events were written under.
    assert [e.sequence_number for e in await store.read_events("resp_fence", 1)] == [2, 3, 4]
    assert [e.sequence_number for e in await store.read_events("resp_fence", 2)] == [3, 4]
    assert [e.sequence_number for e in await store.read_events("resp_fence", -1, limit=2)] == [0, 1]
    record = await store.get_response("resp_fence")
    assert record is not None
    assert (text_of(record.snapshot), record.last_sequence_number) == ("abcd", 4)


async def test_a_snapshotless_append_is_refused_after_the_end_and_for_a_missing_response(store: Store) -> None:
    lease = await store.create_response(text_response("resp_plain_end"))
    assert lease is not None
    closing = [event(1, "response.completed")]
    await store.append_events(
        "resp_plain_end", closing, snapshot=b'{"status":"completed"}', status="completed", lease=lease
    )
    with pytest.raises(ResponseClosed):
        await store.append_events("resp_plain_end", [delta(2, "x")], snapshot=None, status="", lease=lease)
    with pytest.raises(ResponseMissing):
        await store.append_events("resp_never", [delta(0, "x")], snapshot=None, status="", lease=lease)
    assert await store.get_response("resp_never") is None
    assert await store.read_events("resp_never", -1) == []


async def test_repeating_a_snapshotless_append_is_idempotent(store: Store) -> None:
    lease = await store.create_response(text_response("resp_plain_retry"))
    assert lease is not None
    batch = [delta(1, "a"), delta(2, "b")]
    await store.append_events("resp_plain_retry", batch, snapshot=None, status="", lease=lease)
    await store.append_events("resp_plain_retry", batch, snapshot=None, status="", lease=lease)
    assert [e.sequence_number for e in await store.read_events("resp_plain_retry", -1)] == [0, 1, 2]
    with pytest.raises(SequenceConflict):  # the same numbers with other content: another writer's
        await store.append_events("resp_plain_retry", [delta(2, "other")], snapshot=None, status="", lease=lease)


async def test_plain_appends_of_many_responses_at_once_each_land_in_their_own_log(store: Store) -> None:
    leases = [await store.create_response(text_response(f"resp_many_{n}")) for n in range(20)]
    await asyncio.gather(
        *(
            store.append_events(
                f"resp_many_{n}", [delta(1, str(n)), delta(2, "!")], snapshot=None, status="", lease=lease
            )
            for n, lease in enumerate(leases)
            if lease is not None
        )
    )
    for n in range(20):
        record = await store.get_response(f"resp_many_{n}")
        assert record is not None
        assert text_of(record.snapshot) == f"{n}!"
