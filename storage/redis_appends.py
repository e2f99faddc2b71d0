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

from collections.abc import Sequence
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
from storage.redis_mux import LuaScript, RedisCommands
from storage.redis_support import load_lua


class PlainAppends:
    """Snapshotless appends: the events as XADDs, and what a refusal means."""

    def __init__(self, mux: RedisCommands, keys: KeySpace) -> None:
        self._mux = mux
        self._keys = keys
        self._check_script = LuaScript.of(load_lua("check_append.lua"))

    async def append(self, response_id: str, events: Sequence[StoredEvent], lease: Lease) -> None:
        """Write `events` under the lease's epoch; raises as `Store.append_events` does."""
        key = self._keys.response_events(response_id)
        commands: list[tuple[Any, ...]] = [
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
        replies = await self._mux.execute_many(commands)
        missing = refused = False
        for reply in replies:  # one look at each: the common case is every reply an entry id
            if reply is None:
                missing = True
            elif isinstance(reply, Exception):
                refused = True
        if missing:
            raise ResponseMissing(response_id)
        if refused:
            refusal = await self._refusal(response_id, events, lease, replies)
            if refusal is not None:
                raise refusal

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


def append_refusal(verdict: bytes, response_id: str, first_sequence_number: int) -> Exception:
    """The storage contract's error for an append script's refusal (MISSING, CLOSED, FENCED, else CONFLICT)."""
    if verdict == b"MISSING":
        return ResponseMissing(response_id)
    if verdict == b"CLOSED":
        return ResponseClosed(response_id)
    if verdict == b"FENCED":
        return LeaseLost(response_id)
    return SequenceConflict(f"{response_id}: append from {first_sequence_number} does not continue the log")
