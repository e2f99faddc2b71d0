"""The hot path of the Redis backend: snapshotless appends, one plain XADD per event.

A delta needs no read before its write. Its stream entry id, `<lease epoch>-<sequence number>`, is the fence:
Redis refuses an id not above the stream's last one, and claiming a response (or ending it) moves that last id
past every id the old owner could still send (see storage/keys.py). So each event costs one `XADD … NOMKSTREAM`
(NOMKSTREAM: a deleted or expired response is not recreated without its TTL), sent over the shared
auto-pipelined connection (storage/redis_mux.py), so the appends of all runs ready in one loop turn go to Redis
in one write.

Only a refused append costs more: one read-only script then says why (or that a retry found its events already
stored, after a lost reply).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ResponseError

from storage.base import (
    Lease,
    LeaseLost,
    ResponseClosed,
    ResponseMissing,
    SequenceConflict,
    StoredEvent,
    StoreUnavailable,
)
from storage.keys import KeySpace, event_entry_id
from storage.redis_mux import LuaScript, RedisCommands, RedisMux
from storage.redis_support import load_lua


class PlainAppends:
    """Snapshotless appends: the events as XADDs, and what a refusal means."""

    def __init__(self, mux: RedisCommands, keys: KeySpace) -> None:
        self._mux = mux
        # Only the single-node mux hands replies to a callback (see `start`); over a cluster, appends are awaited.
        self._sender = mux if isinstance(mux, RedisMux) else None
        self.begins = self._sender is not None
        self._keys = keys
        # A run appends to one key again and again: its name is made once (a shard's hash and three formats).
        self._events_key = functools.lru_cache(maxsize=4096)(keys.response_events)
        self._check_script = LuaScript.of(load_lua("check_append.lua"))
        self._checking: set[asyncio.Task[None]] = set()

    async def append(self, response_id: str, events: Sequence[StoredEvent], lease: Lease) -> None:
        """Write `events` under the lease's epoch; raises as `Store.append_events` does."""
        replies = await self._mux.execute_many(self._commands(response_id, events, lease))
        verdict = _verdict(response_id, replies)
        if verdict is _REFUSED:
            verdict = await self._refusal(response_id, events, lease, replies)
        if verdict is not None:
            raise verdict

    def start(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        lease: Lease,
        done: Callable[[Exception | None], None],
    ) -> bool:
        """`append` without a task: the commands are queued now and `done` is called with None (stored) or what
        `append` would raise, from the callback of the last reply. False when this connection cannot (a cluster):
        nothing was sent, and the caller awaits `append` instead."""
        if self._sender is None:
            return False
        self._sender.send_then(
            self._commands(response_id, events, lease),
            functools.partial(self._replied, response_id, events, lease, done),
        )
        return True

    def _replied(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        lease: Lease,
        done: Callable[[Exception | None], None],
        replies: list[Any] | StoreUnavailable,
    ) -> None:
        if isinstance(replies, StoreUnavailable):  # the connection failed under them
            done(replies)
            return
        verdict = _verdict(response_id, replies)
        if verdict is not _REFUSED:
            done(verdict)
            return
        # Rare: Redis refused an XADD. Why takes a script's round trip, so a task of its own.
        checking = asyncio.get_running_loop().create_task(
            self._report_refusal(response_id, events, lease, replies, done)
        )
        self._checking.add(checking)
        checking.add_done_callback(self._checking.discard)

    async def _report_refusal(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        lease: Lease,
        replies: list[Any],
        done: Callable[[Exception | None], None],
    ) -> None:
        try:
            refusal = await self._refusal(response_id, events, lease, replies)
        except asyncio.CancelledError:
            done(StoreUnavailable("redis: the check of a refused append was cancelled"))
            raise
        except Exception as error:
            done(error)
            return
        done(refusal)

    def _commands(self, response_id: str, events: Sequence[StoredEvent], lease: Lease) -> list[tuple[Any, ...]]:
        key = self._events_key(response_id)
        return [
            (
                "XADD",
                key,
                "NOMKSTREAM",
                event_entry_id(event.sequence_number, lease.epoch),
                "t",
                event.type,
                "d",
                event.data,
            )
            for event in events
        ]

    async def _refusal(
        self, response_id: str, events: Sequence[StoredEvent], lease: Lease, replies: list[Any]
    ) -> Exception | None:
        """Why Redis refused part of an append (None: its events are all stored after all)."""
        error = next(reply for reply in replies if isinstance(reply, Exception))
        if not isinstance(error, ResponseError):
            return StoreUnavailable(f"redis: {error}")
        final = events[-1]
        keys = [self._keys.response_state(response_id), self._keys.response_events(response_id)]
        final_id = event_entry_id(final.sequence_number, lease.epoch)
        verdict = await self._mux.script(self._check_script, keys, [lease.owner, lease.epoch, final_id, final.data])
        return None if verdict == b"OK" else append_refusal(verdict, response_id, events[0].sequence_number)


# An append with a refused XADD: a script must say why (see PlainAppends._refusal).
_REFUSED = ResponseError("refused")


def _verdict(response_id: str, replies: list[Any]) -> Exception | None:
    """What the XADDs' replies mean: None (all stored), ResponseMissing (NOMKSTREAM found no stream), or _REFUSED.
    One look at each: the common case is every reply an entry id."""
    missing = refused = False
    for reply in replies:
        if reply is None:
            missing = True
        elif isinstance(reply, Exception):
            refused = True
    if missing:
        return ResponseMissing(response_id)
    return _REFUSED if refused else None


def append_refusal(verdict: bytes, response_id: str, first_sequence_number: int) -> Exception:
    """The storage contract's error for an append script's refusal (MISSING, CLOSED, FENCED, else CONFLICT)."""
    if verdict == b"MISSING":
        return ResponseMissing(response_id)
    if verdict == b"CLOSED":
        return ResponseClosed(response_id)
    if verdict == b"FENCED":
        return LeaseLost(response_id)
    return SequenceConflict(f"{response_id}: append from {first_sequence_number} does not continue the log")
