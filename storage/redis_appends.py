"""The hot path of the Redis backend: snapshotless appends of every run in this process, one pipeline a loop turn.

A delta needs no read before its write. Its stream entry id, `<lease epoch>-<sequence number>`, is the fence:
Redis refuses an id not above the stream's last one, and claiming a response (or ending it) moves that last id
past every id the old owner could still send (see storage/keys.py). So each event costs one `XADD … NOMKSTREAM`
(NOMKSTREAM: a deleted or expired response is not recreated without its TTL), and the appends of all runs that
are ready in the same loop turn go to Redis in one round trip.

Only a refused append costs more: one read-only script then says why (or that a retry found its events already
stored, after a lost reply).

The pipeline goes over a connection of its own, written and read directly (one deadline for the whole batch),
not through the shared pool: a pool checkout, a pipeline object and a timeout per reply were most of the cost of
an append at light load, where each one carries a single event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
from storage.redis_support import COMMAND_TIMEOUT_SECONDS, load_lua


@dataclass(slots=True)
class _Pending:
    response_id: str
    events: Sequence[StoredEvent]
    lease: Lease
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PlainAppends:
    """Collects snapshotless appends and writes each loop turn's worth in one pipeline, while the previous one is
    in flight the next ones gather (so a busy process sends fewer, larger round trips, never more)."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace) -> None:
        self._client = client
        self._keys = keys
        self._check_script = client.register_script(load_lua("check_append.lua"))
        pool = client.connection_pool
        # No per-read socket timeout: the batch as a whole has one deadline (COMMAND_TIMEOUT_SECONDS).
        self._connection: aioredis.connection.AbstractConnection = pool.connection_class(
            **{**pool.connection_kwargs, "socket_timeout": None}
        )
        self._queued: list[_Pending] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def append(self, response_id: str, events: Sequence[StoredEvent], lease: Lease) -> None:
        """Write `events` under the lease's epoch; raises as `Store.append_events` does."""
        pending = _Pending(response_id, events, lease)
        self._queued.append(pending)
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="redis-plain-appends")
        await pending.done

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._connection.disconnect()
        for pending in self._queued:
            if not pending.done.done():
                pending.done.set_exception(StoreUnavailable("redis: the store is closing"))
        self._queued.clear()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                batch, self._queued = self._queued, []
                await self._write(batch)

    async def _write(self, batch: list[_Pending]) -> None:
        commands: list[tuple[bytes | str, ...]] = []
        for pending in batch:
            key = self._keys.response_events(pending.response_id)
            epoch = pending.lease.epoch
            for event in pending.events:
                entry_id = event_entry_id(event.sequence_number, epoch)
                commands.append(("XADD", key, "NOMKSTREAM", entry_id, "t", event.type, "d", event.data))
        try:
            replies = await self._send(commands)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as error:
            # Some may have been written: a retry finds those already stored and writes only the rest.
            for pending in batch:
                _settle(pending, StoreUnavailable(f"redis: {error or type(error).__name__}"))
            return
        except BaseException as error:
            for pending in batch:
                _settle(pending, StoreUnavailable(f"redis: {error!r}"))
            raise
        offset = 0
        for pending in batch:
            own = replies[offset : offset + len(pending.events)]
            offset += len(pending.events)
            if any(reply is None for reply in own):
                _settle(pending, ResponseMissing(pending.response_id))
            elif any(isinstance(reply, Exception) for reply in own):
                _settle(pending, await self._refusal(pending, own))
            else:
                _settle(pending, None)

    async def _send(self, commands: list[tuple[bytes | str, ...]]) -> list[object]:
        """Send the commands in one write and read their replies (a refusal is a ResponseError among them)."""
        connection = self._connection
        replies: list[object] = []
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as refusal:
                        replies.append(refusal)
        except BaseException:
            # Replies may still be on their way (or never come): this connection is not reused as it is.
            await connection.disconnect(nowait=True)
            raise
        return replies

    async def _refusal(self, pending: _Pending, replies: list[object]) -> Exception | None:
        """Why Redis refused part of an append (None: its events are all stored after all)."""
        if not all(isinstance(reply, ResponseError) for reply in replies if isinstance(reply, Exception)):
            error = next(reply for reply in replies if isinstance(reply, Exception))
            return StoreUnavailable(f"redis: {error}")
        final = pending.events[-1]
        keys = [self._keys.response_state(pending.response_id), self._keys.response_events(pending.response_id)]
        final_id = event_entry_id(final.sequence_number, pending.lease.epoch)
        args: list[bytes | str | int] = [pending.lease.owner, pending.lease.epoch, final_id, final.data]
        try:
            verdict = await self._check_script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            return StoreUnavailable(f"redis: {error}")
        if verdict == b"OK":
            return None
        if verdict == b"MISSING":
            return ResponseMissing(pending.response_id)
        if verdict == b"FENCED":
            return LeaseLost(pending.response_id)
        if verdict == b"CLOSED":
            return ResponseClosed(pending.response_id)
        return SequenceConflict(
            f"{pending.response_id}: append from {pending.events[0].sequence_number} does not continue the log"
        )


def _settle(pending: _Pending, error: Exception | None) -> None:
    if pending.done.done():  # its writer was cancelled meanwhile
        return
    if error is None:
        pending.done.set_result(None)
    else:
        pending.done.set_exception(error)
