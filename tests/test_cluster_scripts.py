"""Every Lua script of the Redis store runs against the real cluster, and each touches the keys of one hash slot:
the cluster refuses a script whose keys span slots (CROSSSLOT), so one call of each store step that runs a script
proves it. The test records which scripts ran and fails if any script in storage/lua did not, so a new script
cannot be added without running on the cluster here."""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

import pytest

from storage.base import IdempotencyClaim, Lease, LeaseLost, OutboxEntry, SteerQueueOutcome, StoredEvent
from storage.keys import idempotency_shard, shard_of, with_shard
from storage.redis import RedisStore
from storage.redis_cluster import ClusterCommands
from storage.redis_mux import LuaScript
from storage.redis_support import load_lua
from tests.test_storage_contract import OWNER, event, new_response


def every_script() -> dict[str, str]:
    """SHA -> file name of every script in storage/lua."""
    names = [entry.name for entry in (resources.files("storage") / "lua").iterdir() if entry.name.endswith(".lua")]
    return {LuaScript.of(load_lua(name)).sha: name for name in names}


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The SHAs of the scripts the cluster store sends (EVALSHA, or EVAL after NOSCRIPT), however it sends them."""
    seen: set[str] = set()
    execute, execute_many = ClusterCommands.execute, ClusterCommands.execute_many

    def note(command: tuple[Any, ...]) -> None:
        if command[0] == "EVALSHA":
            seen.add(str(command[1]))
        elif command[0] == "EVAL":
            seen.add(LuaScript.of(str(command[1])).sha)

    async def recording_execute(self: ClusterCommands, *args: Any) -> Any:
        note(args)
        return await execute(self, *args)

    async def recording_execute_many(self: ClusterCommands, commands: list[tuple[Any, ...]]) -> list[Any]:
        for command in commands:
            note(command)
        return await execute_many(self, commands)

    monkeypatch.setattr(ClusterCommands, "execute", recording_execute)
    monkeypatch.setattr(ClusterCommands, "execute_many", recording_execute_many)
    return seen


async def test_every_script_runs_on_the_cluster(redis_cluster_url: str, key_prefix: str, ran: set[str]) -> None:
    store = RedisStore.from_url(redis_cluster_url, key_prefix=key_prefix, retention_seconds=60)
    try:
        await _every_step(store)
    finally:
        await store.close()
    scripts = every_script()
    missing = sorted(name for sha, name in scripts.items() if sha not in ran)
    assert not missing, f"scripts that never ran on the cluster: {missing}"


async def _every_step(store: RedisStore) -> None:
    lease = Lease(OWNER, 1, 0)
    # A keyed response, created in its key's shard: the claim and the create share one slot.
    keyed = with_shard("resp_keyed_00", idempotency_shard("default", "key-1"))
    claim = IdempotencyClaim(fingerprint="f1", response_id=keyed, claimed_at_ms=0)
    assert (
        await store.claim_idempotency_key("default", "key-1", fingerprint="f1", response_id=keyed, ttl_seconds=60)
        is None
    )
    assert await store.replace_idempotency_claim(
        "default", "key-1", expected_response_id=keyed, claim=claim, ttl_seconds=60
    )
    await store.create_response(dataclasses.replace(new_response(keyed, events=2), idempotency=("default", "key-1")))
    await store.append_events(
        keyed, [event(2)], snapshot=b'{"status":"in_progress"}', status="in_progress", lease=lease
    )
    await store.append_events(keyed, [event(3)], snapshot=None, status="in_progress", lease=lease)
    await store.renew_lease(keyed, lease, lease_ms=60_000, stored_through=3)
    await store.release_lease(keyed, lease)
    claimed = await store.claim_response(keyed, "instance-b", lease_ms=60_000)
    assert claimed is not None
    new_lease, _ = claimed
    await store.append_events(keyed, [event(4)], snapshot=None, status="in_progress", lease=new_lease)
    # The old owner's plain append is refused by Redis (its entry id is below the claim's), and a read-only script
    # says why.
    with pytest.raises(LeaseLost):
        await store.append_events(keyed, [event(5)], snapshot=None, status="in_progress", lease=lease)
    # After the claim, reading after an event of the new epoch by its number alone needs the claim record (a script).
    assert [e.sequence_number for e in await store.read_events(keyed, 3)] == [4]
    assert await store.read_events(keyed, 4) == []
    assert await store.due_runs(10) is not None
    assert (await store.get_response(keyed)) is not None
    assert await store.request_cancel(keyed) == "in_progress"
    # Steering: queued while it runs; settling waits for it; a successor made in its shard commits it.
    assert await store.queue_steer(keyed, b'{"id":"steer_1","input":[]}', max_pending=4) is SteerQueueOutcome.QUEUED
    done = StoredEvent(5, "response.completed", b'{"type":"response.completed","sequence_number":5}')
    owed = OutboxEntry(keyed, b'{"endpoint":"e"}')
    await store.append_events(
        keyed, [done], snapshot=b'{"status":"completed"}', status="completed", lease=new_lease, outbox=[owed]
    )
    # The webhook it owes entered its shard's outbox with it: claimed (not due again meanwhile), retried, done.
    assert await store.due_webhooks(10, claim_ms=60_000) == [owed]
    assert await store.due_webhooks(10, claim_ms=60_000) == []
    await store.retry_webhook(owed, delay_ms=0)
    assert await store.due_webhooks(10, claim_ms=60_000) == [owed]
    await store.webhook_done(owed)
    await store.retry_webhook(owed, delay_ms=0)  # gone: a retry does not bring it back
    assert await store.due_webhooks(10, claim_ms=0) == []
    assert not await store.settle_response(keyed, idempotency_ttl_seconds=60)
    assert len((await store.steer_state(keyed)).queued) == 1
    successor = with_shard("resp_successor_00", shard_of(keyed))
    await store.create_response(dataclasses.replace(new_response(successor), takes_steers=(keyed, 1)))
    assert (await store.steer_state(keyed)).successor == successor
    await store.resolve_steers(keyed, "pending")  # resolved already: changes nothing
    assert await store.settle_response(keyed, idempotency_ttl_seconds=60)
    await store.release_idempotency_key("default", "key-1", response_id="resp_other")  # names another: kept
    await store.delete_response(keyed)
    # An admission undone, with its conversation turn.
    await store.create_conversation("conv_1", created_at=1, metadata=b"{}", items=[("msg_1", b'{"id":"msg_1"}')])
    undone = "resp_undone_00"
    await store.create_response(new_response(undone))
    assert await store.begin_conversation_turn("conv_1", undone) is None
    await store.abandon_admission(undone, idempotency=None, conversation_id="conv_1")
    turn = "resp_turn_000"
    await store.create_response(new_response(turn))
    assert await store.begin_conversation_turn("conv_1", turn) is None
    await store.end_conversation_turn("conv_1", turn, completed=True, items=[("msg_2", b'{"id":"msg_2"}')])
    assert await store.append_conversation_items("conv_1", [("msg_3", b'{"id":"msg_3"}')]) is None
    items, _ = await store.list_conversation_items("conv_1", after=None, limit=10, order="asc")
    assert len(items) == 3
    await store.delete_conversation("conv_1")
