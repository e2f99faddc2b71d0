"""The Redis event feed: one blocking XREAD over every watched response, woken by CLIENT UNBLOCK."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from storage.base import (
    StoredEvent,
)
from storage.keys import KeySpace, after_entry_id, epoch_at
from storage.redis_support import parse_entries, raise_if_cancelling, unavailable_on_connection_error

# The longest one read blocks in Redis; a longer wait returns early (empty), which the contract allows. With the
# margin below it bounds how long a connection that silently stopped delivering (a failover without a reset) goes
# unnoticed.
READ_BLOCK_CAP_MS = 1_000
# A read that has not answered this long after its block time is over is on a dead connection: it is dropped.
READ_REPLY_MARGIN_SECONDS = 1.0
# TCP keepalive on the reader, so the kernel also gives up on a peer that vanished while the connection was idle.
KEEPALIVE_IDLE_SECONDS = 5
KEEPALIVE_INTERVAL_SECONDS = 1
KEEPALIVE_PROBES = 3


def _keepalive_options() -> dict[int, int]:
    if sys.platform == "linux":
        return {
            socket.TCP_KEEPIDLE: KEEPALIVE_IDLE_SECONDS,
            socket.TCP_KEEPINTVL: KEEPALIVE_INTERVAL_SECONDS,
            socket.TCP_KEEPCNT: KEEPALIVE_PROBES,
        }
    return {}  # the platform's defaults; the read deadline still applies


class RedisEventFeed:
    """XREAD BLOCK over every watched stream on one dedicated connection; `interrupt` wakes it with CLIENT UNBLOCK
    from another connection, so a new subscriber's response joins the read at once. A read that does not answer
    within its block time plus a margin fails (StoreUnavailable) and the next read starts on a fresh connection."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace) -> None:
        self._control = client
        # A connection of its own: a socket timeout just past the longest block, keepalive, and no silent
        # reconnect-and-retry, so a new connection (with a new CLIENT ID) is always noticed.
        pool = client.connection_pool
        kwargs = {
            **pool.connection_kwargs,
            "socket_timeout": READ_BLOCK_CAP_MS / 1000 + READ_REPLY_MARGIN_SECONDS,
            "socket_keepalive": True,
            "socket_keepalive_options": _keepalive_options(),
            "retry": Retry(NoBackoff(), 0),
        }
        self._reader = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
        )
        self._keys = keys
        self._reader_id: int | None = None
        self._reading = False
        # The last entry each response's reads returned, (sequence number, epoch): its epoch makes the next read's
        # entry id. A cursor the feed did not return itself is turned into an entry id from the claim record.
        self._positions: dict[str, tuple[int, int]] = {}

    @unavailable_on_connection_error
    async def read(self, cursors: Mapping[str, int], *, wait_ms: int) -> dict[str, list[StoredEvent]]:
        if not cursors:
            return {}
        streams = await self._stream_ids(cursors)
        by_key = {self._keys.response_events(rid).encode(): rid for rid in cursors}
        try:
            if self._reader_id is None:
                self._reader_id = int(await self._reader.client_id())
            self._reading = True
            block_ms = min(max(wait_ms, 1), READ_BLOCK_CAP_MS)
            reply = await self._reader.xread(streams, count=512, block=block_ms)  # type: ignore[arg-type]
            raise_if_cancelling()
        except BaseException:
            # Drop the connection, whatever state it is in: a reply may still be on its way, or never come. The
            # next read connects afresh and reads its new CLIENT ID.
            self._reader_id = None
            with contextlib.suppress(Exception):  # the read's own error is the one to report
                await self._reader.connection_pool.disconnect()
            raise
        finally:
            self._reading = False
        if not reply:
            return {}
        # RESP2 answers a list of [stream, entries]; RESP3 a mapping of stream -> entries.
        pairs: list[Any] = list(reply.items()) if isinstance(reply, dict) else list(reply)
        found = {by_key[bytes(key)]: parse_entries(list(entries)) for key, entries in pairs}
        for response_id, events in found.items():
            if events:
                self._positions[response_id] = (events[-1].sequence_number, events[-1].epoch)
        return found

    async def _stream_ids(self, cursors: Mapping[str, int]) -> dict[str, str]:
        for response_id in [rid for rid in self._positions if rid not in cursors]:
            del self._positions[response_id]
        unknown = [
            rid for rid, after in cursors.items() if after >= 0 and self._positions.get(rid, (None,))[0] != after
        ]
        if unknown:
            pipe = self._control.pipeline(transaction=False)
            for response_id in unknown:
                pipe.hget(self._keys.response_state(response_id), "epochs")
            records: list[bytes | None] = await pipe.execute()
            for response_id, record in zip(unknown, records, strict=True):
                after = cursors[response_id]
                self._positions[response_id] = (after, epoch_at((record or b"").decode(), after))
        streams = {}
        for response_id, after in cursors.items():
            epoch = self._positions[response_id][1] if after >= 0 else 1
            streams[self._keys.response_events(response_id)] = after_entry_id(after, epoch)
        return streams

    async def interrupt(self) -> None:
        # The XREAD may not have reached Redis yet when this runs; retry briefly rather than let the new
        # subscriber wait a whole block period.
        for _ in range(20):
            if not self._reading or self._reader_id is None:
                return
            if await self._control.client_unblock(self._reader_id):
                return
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        await self._reader.aclose(close_connection_pool=True)
