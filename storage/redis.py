"""The Redis backend: a Stream per response for events, a hash for its snapshot, Lua for every read-then-write."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from storage.base import (
    DeleteOutcome,
    NewResponse,
    ResponseAlreadyExists,
    ResponseClosed,
    ResponseMissing,
    ResponseRecord,
    SequenceConflict,
    StoredEvent,
)
from storage.keys import KeySpace, after_entry_id, event_entry_id

log = logging.getLogger(__name__)

# How long to wait before re-subscribing after the pub/sub connection failed.
RESUBSCRIBE_DELAY_SECONDS = 1.0


def _load_lua(name: str) -> str:
    return (resources.files("storage") / "lua" / name).read_text(encoding="utf-8")


def _event_args(events: Sequence[StoredEvent]) -> list[bytes | str]:
    args: list[bytes | str] = []
    for event in events:
        args += (event_entry_id(event.sequence_number), event.type, event.data)
    return args


def _parse_entries(entries: list[Any]) -> list[StoredEvent]:
    events = []
    for entry_id, fields in entries:
        sequence_number = int(entry_id.split(b"-", 1)[1])
        events.append(StoredEvent(sequence_number, fields[b"t"].decode(), fields[b"d"]))
    return events


class RedisStore:
    """Store backed by Redis (or any server speaking its protocol, ≥ 6.2 for exclusive XRANGE)."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str, retention_seconds: int) -> None:
        self._client = client
        self._keys = KeySpace(key_prefix)
        self._ttl_ms = retention_seconds * 1000
        self._create_script = client.register_script(_load_lua("create_response.lua"))
        self._append_script = client.register_script(_load_lua("append_events.lua"))
        self._delete_script = client.register_script(_load_lua("delete_response.lua"))
        self._cancel_script = client.register_script(_load_lua("request_cancel.lua"))

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, retention_seconds: int) -> RedisStore:
        """A store on the Redis at `url` (`redis://…` or `rediss://…`)."""
        client = aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30)
        return cls(client, key_prefix=key_prefix, retention_seconds=retention_seconds)

    @property
    def keys(self) -> KeySpace:
        """The key names this store writes (for tests and operators)."""
        return self._keys

    async def create_response(self, new: NewResponse) -> None:
        keys = self._keys.response_keys(new.response_id)
        args: list[bytes | str | int] = [
            self._ttl_ms,
            new.snapshot,
            new.status,
            int(new.background),
            int(new.stored),
            new.input_items,
        ]
        args += _event_args(new.events)
        result = await self._create_script(keys=list(keys), args=args)
        if result == b"EXISTS":
            raise ResponseAlreadyExists(new.response_id)

    async def append_events(
        self, response_id: str, events: Sequence[StoredEvent], *, snapshot: bytes, status: str
    ) -> None:
        if not events:
            return
        keys = self._keys.response_keys(response_id)
        args: list[bytes | str | int] = [self._ttl_ms, snapshot, status, events[0].sequence_number]
        args += _event_args(events)
        result = await self._append_script(keys=list(keys), args=args)
        if result == b"OK":
            return
        if result == b"MISSING":
            raise ResponseMissing(response_id)
        if result == b"CLOSED":
            raise ResponseClosed(response_id)
        raise SequenceConflict(f"{response_id}: append from {events[0].sequence_number} does not continue the log")

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        key = self._keys.response_state(response_id)
        fields: dict[bytes, bytes] = await self._client.hgetall(key)  # type: ignore[assignment]
        if not fields:
            return None
        return ResponseRecord(
            response_id=response_id,
            snapshot=fields[b"snapshot"],
            status=fields[b"status"].decode(),
            last_sequence_number=int(fields[b"last_seq"]),
            background=fields[b"background"] == b"1",
            stored=fields[b"stored"] == b"1",
        )

    async def get_input_items(self, response_id: str) -> bytes | None:
        value: bytes | None = await self._client.get(self._keys.response_input(response_id))  # type: ignore[assignment]
        return value

    async def read_events(
        self, response_id: str, after: int, *, limit: int = 512, wait_ms: int = 0
    ) -> list[StoredEvent]:
        key = self._keys.response_events(response_id)
        if wait_ms <= 0:
            low = f"({after_entry_id(after)}"
            entries: list[Any] = await self._client.xrange(key, min=low, max="+", count=limit)  # type: ignore[assignment]
            return _parse_entries(entries)
        reply = await self._client.xread({key: after_entry_id(after)}, count=limit, block=wait_ms)
        if not reply:
            return []
        # RESP2 answers a list of [stream, entries]; RESP3 a mapping of stream -> entries.
        streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
        return [event for entries in streams for event in _parse_entries(list(entries))]

    async def delete_response(self, response_id: str, *, only_if_finished: bool = True) -> DeleteOutcome:
        keys = self._keys.response_keys(response_id)
        result = await self._delete_script(keys=list(keys), args=[int(only_if_finished)])
        return DeleteOutcome(result.decode().lower())

    async def request_cancel(self, response_id: str) -> str | None:
        channel = self._keys.cancel_channel()
        status = await self._cancel_script(keys=[self._keys.response_state(response_id)], args=[channel, response_id])
        return status.decode() if status else None

    async def cancel_requests(self) -> AsyncIterator[str]:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel())
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield message["data"].decode()
            except (ConnectionError, OSError, aioredis.RedisError) as error:
                log.warning("cancel channel lost (%s); resubscribing", error)
                await asyncio.sleep(RESUBSCRIBE_DELAY_SECONDS)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def open_event_feed(self) -> RedisEventFeed:
        return RedisEventFeed(self._client, self._keys)

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


class RedisEventFeed:
    """XREAD BLOCK over every watched stream on one dedicated connection; `interrupt` wakes it with CLIENT UNBLOCK
    from another connection, so a new subscriber's response joins the read at once."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace) -> None:
        self._control = client
        self._reader = client.client()  # holds one connection of the pool for itself
        self._keys = keys
        self._reader_id: int | None = None
        self._reading = False

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
        except BaseException:
            self._reader_id = None  # the connection may have been replaced
            raise
        finally:
            self._reading = False
        if not reply:
            return {}
        # RESP2 answers a list of [stream, entries]; RESP3 a mapping of stream -> entries.
        pairs: list[Any] = list(reply.items()) if isinstance(reply, dict) else list(reply)
        return {by_key[bytes(key)]: _parse_entries(list(entries)) for key, entries in pairs}

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
        await self._reader.aclose()
