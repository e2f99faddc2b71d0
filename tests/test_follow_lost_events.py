"""A follower (runs/subscription.py) whose events the store has lost is told (EventsLost), on one node and on the
cluster, whichever way it came to its cursor: never left waiting, never handed a mix of two histories."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from runs.errors import EventsLost
from runs.live import LiveEvents
from runs.subscription import follow_events
from storage.base import Lease, LogRewound, StoredEvent
from storage.redis import RedisStore
from tests.test_storage_contract import OWNER, event, new_response

LEASE = Lease(OWNER, 1, 0)


@pytest.fixture
async def store_and_live(shared_redis_url: str, key_prefix: str) -> AsyncIterator[tuple[RedisStore, LiveEvents]]:
    store = RedisStore.from_url(shared_redis_url, key_prefix=key_prefix, retention_seconds=60)
    live = LiveEvents(store.open_event_feed(), wait_ms=200)
    live.start()
    yield store, live
    await live.close()
    await store.close()


async def drain(follower: AsyncIterator[list[StoredEvent] | None], into: list[int], until: int) -> None:
    """Take the follower's events into `into` until it has yielded `until`."""
    async for batch in follower:
        into.extend(event.sequence_number for event in batch or [])
        if into and into[-1] >= until:
            return


async def to_the_end(follower: AsyncIterator[list[StoredEvent] | None]) -> None:
    """Follow to the end; ten seconds is a hang."""
    async with asyncio.timeout(10):
        async for _ in follower:
            pass


async def test_a_cursor_whose_event_is_gone_while_others_follow_its_number(
    store_and_live: tuple[RedisStore, LiveEvents],
) -> None:
    """Its epoch sorts above every stored entry (a claim the failover lost, on a node whose clock ran ahead): a read
    after it finds nothing, though the log goes on past its number."""
    store, live = store_and_live
    await store.create_response(new_response("resp_gone", events=2))
    await store.append_events("resp_gone", [event(n) for n in range(2, 8)], snapshot=None, status="x", lease=LEASE)
    follower = follow_events(store, live, "resp_gone", 5, idle_seconds=0.2, after_epoch=99_999_999_999_999)
    async with contextlib.aclosing(follower):
        with pytest.raises(EventsLost):
            await to_the_end(follower)


@pytest.mark.parametrize("rewritten", [(4, 5, 6, 7), (4,)], ids=["and-past-it", "only-in-place"])
async def test_a_follower_that_started_from_a_bare_number_notices_a_replacement_live(
    store_and_live: tuple[RedisStore, LiveEvents],
    shared_redis_client: aioredis.Redis | RedisCluster,
    rewritten: tuple[int, ...],
) -> None:
    """`starting_after=N` carries no epoch; the first event the follower takes gives it one, and an event later
    written in place of one it took ends its stream, from the live feed: its idle check (which would find the
    loss too) is far away. Also when the new owner writes nothing past the follower's number (it ends the
    response there), which the feed once dropped as already delivered."""
    store, live = store_and_live
    response_id = "resp_bare"
    await store.create_response(new_response(response_id, events=4))
    keys = [store.keys.response_state(response_id), store.keys.response_events(response_id)]
    replica = [await shared_redis_client.dump(key) for key in keys]  # type: ignore[misc]
    follower = follow_events(store, live, response_id, 3, idle_seconds=3600)
    seen: list[int] = []
    async with contextlib.aclosing(follower):
        taking = asyncio.create_task(drain(follower, seen, 6))
        await asyncio.sleep(0.1)  # the follower reads the store (nothing after 3) and waits live
        await store.append_events(response_id, [event(n) for n in (4, 5, 6)], snapshot=None, status="x", lease=LEASE)
        async with asyncio.timeout(10):
            await taking
        assert seen == [4, 5, 6]
        # The master fails over to a replica that had only 0..3; the response is claimed and goes on from 4.
        for key, dump in zip(keys, replica, strict=True):
            await shared_redis_client.restore(key, 60_000, dump, replace=True)  # type: ignore[misc]
        await store.release_lease(response_id, LEASE)
        claimed = await store.claim_response(response_id, "instance-b", lease_ms=60_000)
        assert claimed is not None
        # In place of ones it took (and with 7, past them: it must not take that one).
        await store.append_events(
            response_id, [event(n) for n in rewritten], snapshot=None, status="x", lease=claimed[0]
        )
        with pytest.raises(EventsLost):
            await to_the_end(follower)


async def test_a_renewal_that_finds_the_log_rewound_still_extends_the_lease(
    store_and_live: tuple[RedisStore, LiveEvents],
    shared_redis_client: aioredis.Redis | RedisCluster,
) -> None:
    """The owner is told (LogRewound) and keeps the response long enough to end it past the loss itself."""
    store, _ = store_and_live
    response_id = "resp_renewed"
    lease = await store.create_response(new_response(response_id, events=4))
    assert lease is not None
    events_key = store.keys.response_events(response_id)
    replica = await shared_redis_client.dump(events_key)  # type: ignore[misc]
    await store.append_events(response_id, [event(4), event(5)], snapshot=None, status="x", lease=lease)
    await shared_redis_client.restore(events_key, 60_000, replica, replace=True)  # type: ignore[misc]
    with pytest.raises(LogRewound) as rewound:
        await store.renew_lease(response_id, lease, lease_ms=60_000, stored_through=5)
    assert rewound.value.last_stored == 3
    assert rewound.value.renewed is not None
    assert rewound.value.renewed.until_ms > lease.until_ms
    record = await store.get_response(response_id)
    assert record is not None
    assert record.lease_until_ms == rewound.value.renewed.until_ms
