"""What must hold of a response once its run has ended, read from the store itself (both backends), and a way to
freeze an in-process gateway at a lifecycle boundary as if its process had stopped there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.state import OWNERSHIP
from runs.faults import FaultPoints
from runs.status import TERMINAL_EVENT_TYPES
from storage.base import Store, StoreUnavailable
from storage.keys import SHARDS
from storage.memory import MemoryStore
from storage.redis import RedisStore
from storage.status import TERMINAL_STATUSES


def real_store(store: Any) -> Store:
    """The backend under a FaultyStore and the metrics' timing wrapper (both keep it as `.inner`)."""
    while not isinstance(store, (RedisStore, MemoryStore)):
        store = store.inner
    result: Store = store
    return result


async def index_members(store: Store) -> tuple[set[str], set[str]]:
    """(run index, queue) members, read from the backend itself."""
    store = real_store(store)
    if isinstance(store, RedisStore):
        client = store._client
        index: set[str] = set()
        queue: set[str] = set()
        for shard in range(SHARDS):
            index |= {member.decode() for member in await client.zrange(store.keys.run_index(shard), 0, -1)}
            queue |= {member.decode() for member in await client.zrange(store.keys.run_queue(shard), 0, -1)}
        return index, queue
    assert isinstance(store, MemoryStore)
    return set(store._run_index), set(store._queue)


async def assert_settled(
    store: Store,
    response_id: str,
    *,
    conversation_id: str | None = None,
    idempotency: tuple[str, str] | None = None,
    status: str | None = None,
) -> list[dict[str, Any]]:
    """The response has ended, once, for good, and everything that must agree with that does: a terminal stored
    status; a log contiguous from 0 with exactly one terminal event, last; out of the run index and queue; its
    conversation turn released; its idempotency key naming it. Returns the events."""
    record = await store.get_response(response_id)
    assert record is not None, f"{response_id} is gone"
    assert record.status in TERMINAL_STATUSES, f"{response_id} is {record.status}"
    if status is not None:
        assert record.status == status, f"{response_id} is {record.status}, expected {status}"
    events = await store.read_events(response_id, -1, limit=100_000)
    assert [event.sequence_number for event in events] == list(range(len(events))), "gap or duplicate"
    terminal = [event for event in events if event.type in TERMINAL_EVENT_TYPES]
    assert len(terminal) == 1, f"{response_id}: {len(terminal)} terminal events"
    assert events[-1].type in TERMINAL_EVENT_TYPES, f"{response_id}: the terminal event is not last"
    assert orjson.loads(events[-1].data)["response"]["status"] == record.status
    index, queue = await index_members(store)
    assert response_id not in index, f"{response_id} is still in the run index"
    assert response_id not in queue, f"{response_id} is still queued"
    if conversation_id is not None:
        conversation = await store.get_conversation(conversation_id)
        if conversation is not None:
            assert conversation.active_response_id != response_id, f"{response_id} still holds its turn"
    if idempotency is not None:
        claim = await store.claim_idempotency_key(
            *idempotency, fingerprint="probe", response_id="probe", ttl_seconds=60
        )
        assert claim is not None, "the idempotency key was released"
        assert claim.response_id == response_id, f"the key names {claim.response_id}"
    return [orjson.loads(event.data) for event in events]


async def eventually_settled(store: Store, response_id: str, *, within: float = 15.0, **expected: Any) -> list[Any]:
    """assert_settled, once it holds (within lease + sweep, with margin)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await assert_settled(store, response_id, **expected)
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.1)


class Freezer:
    """Stops an in-process gateway at a lifecycle boundary as a killed process would: the task that reached it
    never goes on, and the instance stops renewing leases and sweeping (to the fleet it is dead)."""

    def __init__(self, *boundaries: str, only: Callable[[str], bool] | None = None) -> None:
        self.boundaries = boundaries
        self.only = only
        self.app: web.Application | None = None
        self.reached: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.faults = FaultPoints()
        self.faults.set(boundaries, self._freeze)

    async def _freeze(self, boundary: str, response_id: str) -> None:
        if self.only is not None and not self.only(response_id):
            return
        assert self.app is not None
        if not self.reached.done():
            self.reached.set_result(response_id)
        for task in self.app[OWNERSHIP]._tasks:
            task.cancel()
        await asyncio.Event().wait()


class FaultyStore:
    """The real store, with chosen steps failing: `fail[name]` returns the exception to raise for a call (or None to
    let it through). Everything else is the real store's own behaviour."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fail: dict[str, Callable[..., BaseException | None]] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if not callable(target) or name.startswith("_"):
            return target
        if name in ("run_notices", "open_event_feed"):
            return target
        if name == "start_append":
            # A begun append is an `append_events`: with a rule for that, it is declined, so the log awaits
            # `append_events` (and meets the rule, with the arguments it decides on).
            return (lambda *_, **__: False) if "append_events" in self.fail else target

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            rule = self.fail.get(name)
            if rule is not None:
                error = rule(*args, **kwargs)
                if error is not None:
                    raise error
            return await target(*args, **kwargs)

        return call


def unavailable(times: int) -> Callable[..., BaseException | None]:
    """A rule: the first `times` calls find the store unreachable."""
    left = [times]

    def rule(*_: Any, **__: Any) -> BaseException | None:
        if left[0] <= 0:
            return None
        left[0] -= 1
        return StoreUnavailable("injected: store unreachable")

    return rule
