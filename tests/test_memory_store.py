"""The embedded store's own machinery, beyond the shared contract: its expiry bookkeeping and its feed's wake-ups."""

from __future__ import annotations

import asyncio

import pytest

from storage.base import DeleteOutcome
from storage.memory import MemoryStore
from tests.test_storage_contract import LEASE, FakeClock, event, new_response


async def test_expiry_keeps_one_slot_per_response_and_drops_it_on_delete() -> None:
    # Each write used to push another expiry record that outlived even the response's deletion (200k appends:
    # 18 MB kept for a response that no longer existed).
    store = MemoryStore(retention_seconds=60)
    await store.create_response(new_response("resp_long", events=1))
    for seq in range(1, 201):
        await store.append_events("resp_long", [event(seq)], snapshot=b"{}", status="in_progress", lease=LEASE)
    assert len(store._expiry) == 1
    await store.append_events(
        "resp_long", [event(201, "response.completed")], snapshot=b"{}", status="completed", lease=LEASE
    )
    assert await store.delete_response("resp_long") is DeleteOutcome.DELETED
    assert len(store._expiry) == 0
    await store.close()


async def test_expiry_follows_the_last_write_of_each_response() -> None:
    clock = FakeClock()
    store = MemoryStore(retention_seconds=10, clock=clock)
    await store.create_response(new_response("resp_old", events=1))
    await store.create_response(new_response("resp_new", events=1))
    clock.now += 5
    await store.append_events("resp_old", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE)
    clock.now += 6  # resp_new unwritten for 11 s, resp_old for 6 s
    assert await store.get_response("resp_new") is None
    assert list(store._expiry) == ["resp_old"]
    assert await store.get_response("resp_old") is not None
    clock.now += 5
    assert await store.get_response("resp_old") is None
    assert len(store._expiry) == 0
    await store.close()


async def test_conversations_expire_in_last_write_order() -> None:
    clock = FakeClock()
    store = MemoryStore(retention_seconds=10, clock=clock)
    await store.create_conversation("conv_a", created_at=0, metadata=b"{}", items=[])
    await store.create_conversation("conv_b", created_at=0, metadata=b"{}", items=[])
    clock.now += 5
    await store.set_conversation_metadata("conv_a", b'{"k":"v"}')
    clock.now += 6
    # conv_b goes when any conversation is looked at, not only when it is itself asked for again.
    assert await store.get_conversation("conv_a") is not None
    assert list(store._conversations) == ["conv_a"]
    clock.now += 5
    assert await store.get_conversation("conv_a") is None
    await store.close()


@pytest.mark.parametrize("wake", ["append", "interrupt"])
async def test_feed_wakes_for_what_lands_just_after_it_looked(wake: str) -> None:
    store = MemoryStore(retention_seconds=60)
    await store.create_response(new_response("resp_f", events=1))
    feed = store.open_event_feed()
    # Tasks run in the order they are made: the read looks (nothing yet) and starts its waiters, then the append
    # (or interrupt) runs to the end (it never awaits), before either waiter has run once. That is the window the
    # read's wake-up used to fall through, sleeping out its wait_ms; wait_ms is long so a miss cannot pass as a
    # slow wake-up.
    reading = asyncio.ensure_future(feed.read({"resp_f": 0}, wait_ms=10_000))
    waking = asyncio.ensure_future(
        store.append_events("resp_f", [event(1)], snapshot=b"{}", status="in_progress", lease=LEASE)
        if wake == "append"
        else feed.interrupt()
    )
    found = await asyncio.wait_for(reading, 1)
    await waking
    assert {rid: [e.sequence_number for e in events] for rid, events in found.items()} == (
        {"resp_f": [1]} if wake == "append" else {}
    )
    await store.close()


async def test_feed_interrupt_wakes_only_the_read_in_progress() -> None:
    # As the Redis feed: a read that starts after an interrupt was given cursors that already include the change,
    # so the interrupt does not cut it short.
    store = MemoryStore(retention_seconds=60)
    await store.create_response(new_response("resp_j", events=1))
    feed = store.open_event_feed()
    await feed.interrupt()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await feed.read({"resp_j": 0}, wait_ms=200) == {}
    assert loop.time() - started >= 0.15
    await store.close()
