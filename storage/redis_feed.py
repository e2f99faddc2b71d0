"""The Redis event feed: one blocking XREAD over every watched response, woken by CLIENT UNBLOCK."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from storage.base import (
    StoredEvent,
)
from storage.keys import KeySpace, after_entry_id
from storage.redis_support import parse_entries, raise_if_cancelling, unavailable_on_connection_error


class RedisEventFeed:
    """XREAD BLOCK over every watched stream on one dedicated connection; `interrupt` wakes it with CLIENT UNBLOCK
    from another connection, so a new subscriber's response joins the read at once."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace) -> None:
        self._control = client
        # A connection of its own: no socket timeout (it blocks on purpose) and no silent reconnect-and-retry,
        # so a new connection (with a new CLIENT ID) is always noticed.
        pool = client.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": None, "retry": Retry(NoBackoff(), 0)}
        self._reader = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
        )
        self._keys = keys
        self._reader_id: int | None = None
        self._reading = False

    @unavailable_on_connection_error
    async def read(self, cursors: Mapping[str, int], *, wait_ms: int) -> dict[str, list[StoredEvent]]:
        if not cursors:
            return {}
        streams = {self._keys.response_events(rid): after_entry_id(after) for rid, after in cursors.items()}
        by_key = {self._keys.response_events(rid).encode(): rid for rid in cursors}
        try:
            if self._reader_id is None:
                self._reader_id = int(await self._reader.client_id())
            self._reading = True
            reply = await self._reader.xread(streams, count=512, block=max(wait_ms, 1))  # type: ignore[arg-type]
            raise_if_cancelling()
        except BaseException:
            self._reader_id = None  # the connection may have been replaced
            raise
        finally:
            self._reading = False
        if not reply:
            return {}
        # RESP2 answers a list of [stream, entries]; RESP3 a mapping of stream -> entries.
        pairs: list[Any] = list(reply.items()) if isinstance(reply, dict) else list(reply)
        return {by_key[bytes(key)]: parse_entries(list(entries)) for key, entries in pairs}

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
