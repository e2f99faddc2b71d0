"""The embedded store's own machinery, beyond the shared contract: its expiry bookkeeping and its feed's wake-ups."""

from __future__ import annotations

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
