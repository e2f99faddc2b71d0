"""The Redis backend: a Stream per response for events, a hash for its snapshot, Lua for every read-then-write."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.base import (
    ConversationMissing,
    ConversationRecord,
    CursorNotFound,
    DeleteOutcome,
    IdempotencyClaim,
    Lease,
    LeaseLost,
    NewResponse,
    ResponseAlreadyExists,
    ResponseClosed,
    ResponseMissing,
    ResponseRecord,
    SequenceConflict,
    StoredEvent,
    StoreUnavailable,
)
from storage.keys import KeySpace, after_entry_id, event_entry_id

log = logging.getLogger(__name__)

# How long to wait before re-subscribing after the pub/sub connection failed.
RESUBSCRIBE_DELAY_SECONDS = 1.0


# How often the pub/sub loop wakes up without a message (to notice a cancellation redis-py swallowed).
PUBSUB_POLL_SECONDS = 1.0


def _raise_if_cancelling() -> None:
    """redis-py can swallow a CancelledError that lands while it connects (the task's cancel request stays
    pending); loops that wait on Redis check this so that cancelling them always ends them."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# Commands answer in milliseconds; a Redis that does not answer within this is treated as unavailable.
COMMAND_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0
# Appends and reads wait this long for a free pooled connection before giving up.
POOL_WAIT_SECONDS = 10.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _unavailable_on_connection_error(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Turn redis-py's connection and timeout errors into the storage contract's StoreUnavailable."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise StoreUnavailable(f"redis: {error}") from error

    return wrapper


# Run index members due now (Redis's clock, the one leases are measured by), oldest first.
_DUE_RUNS_LUA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, ARGV[1])
"""

# Delete a lock only if its owner still holds it.
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _pairs(items: Sequence[tuple[str, bytes]]) -> list[bytes | str]:
    flat: list[bytes | str] = []
    for item_id, item in items:
        flat += (item_id, item)
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)


def _claim_json(claim: IdempotencyClaim) -> bytes:
    return orjson.dumps(
        {"fingerprint": claim.fingerprint, "response_id": claim.response_id, "claimed_at_ms": claim.claimed_at_ms}
    )


def _parse_claim(raw: bytes) -> IdempotencyClaim:
    data = orjson.loads(raw)
    return IdempotencyClaim(data["fingerprint"], data["response_id"], int(data["claimed_at_ms"]))


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
        self._claim_script = client.register_script(_load_lua("claim_idempotency_key.lua"))
        self._release_script = client.register_script(_load_lua("release_idempotency_key.lua"))
        self._create_conversation_script = client.register_script(_load_lua("create_conversation.lua"))
        self._conversation_script = client.register_script(_load_lua("conversation.lua"))
        self._list_items_script = client.register_script(_load_lua("list_conversation_items.lua"))
        self._lease_script = client.register_script(_load_lua("lease.lua"))
        self._due_script = client.register_script(_DUE_RUNS_LUA)
        self._unlock_script = client.register_script(_UNLOCK_LUA)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, retention_seconds: int, max_connections: int = 64) -> RedisStore:
        """A store on the Redis at `url` (`redis://…`, `rediss://…`, `unix://…`). Requests beyond
        `max_connections` in flight wait for a free connection instead of failing."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT_SECONDS,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=COMMAND_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, key_prefix=key_prefix, retention_seconds=retention_seconds)

    @property
    def keys(self) -> KeySpace:
        """The key names this store writes (for tests and operators)."""
        return self._keys

    @_unavailable_on_connection_error
    async def create_response(self, new: NewResponse) -> Lease | None:
        keys = self._keys.response_keys(new.response_id)
        args: list[bytes | str | int] = [
            self._ttl_ms,
            new.snapshot,
            new.status,
            int(new.background),
            int(new.stored),
            new.input_items,
            new.request,
            new.owner,
            new.lease_ms,
            new.tenant,
        ]
        args += _event_args(new.events)
        result = await self._create_script(keys=list(keys), args=args)
        if result == b"EXISTS":
            raise ResponseAlreadyExists(new.response_id)
        _, epoch, until = result
        return Lease(new.owner, int(epoch), int(until)) if new.owner else None

    @_unavailable_on_connection_error
    async def append_events(
        self, response_id: str, events: Sequence[StoredEvent], *, snapshot: bytes, status: str, lease: Lease
    ) -> bool:
        if not events:
            return False
        keys = self._keys.response_keys(response_id)
        args: list[bytes | str | int] = [
            self._ttl_ms,
            snapshot,
            status,
            events[0].sequence_number,
            lease.owner,
            lease.epoch,
        ]
        args += _event_args(events)
        result = await self._append_script(keys=list(keys), args=args)
        if result in (b"OK", b"CANCEL"):
            return bool(result == b"CANCEL")
        if result == b"MISSING":
            raise ResponseMissing(response_id)
        if result == b"CLOSED":
            raise ResponseClosed(response_id)
        if result == b"FENCED":
            raise LeaseLost(response_id)
        raise SequenceConflict(f"{response_id}: append from {events[0].sequence_number} does not continue the log")

    async def _lease(self, response_id: str, *args: str | int) -> list[Any]:
        reply: list[Any] = await self._lease_script(keys=[self._keys.response_state(response_id)], args=list(args))
        return reply

    @_unavailable_on_connection_error
    async def renew_lease(self, response_id: str, lease: Lease, *, lease_ms: int) -> Lease:
        reply = await self._lease(response_id, "renew", lease.owner, lease.epoch, lease_ms)
        if reply[0] != b"OK":
            raise LeaseLost(response_id)
        return Lease(lease.owner, lease.epoch, int(reply[1]))

    @_unavailable_on_connection_error
    async def release_lease(self, response_id: str, lease: Lease) -> None:
        await self._lease(response_id, "release", lease.owner, lease.epoch, 0)

    @_unavailable_on_connection_error
    async def claim_response(self, response_id: str, owner: str, *, lease_ms: int) -> tuple[Lease, int] | None:
        reply = await self._lease(response_id, "claim", owner, "", lease_ms)
        if reply[0] != b"OK":
            return None
        return Lease(owner, int(reply[1]), int(reply[2])), int(reply[3])

    @_unavailable_on_connection_error
    async def index_run(self, response_id: str, due_ms: int) -> None:
        index = self._keys.run_index()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(index, {response_id: due_ms})
            pipe.pexpire(index, self._ttl_ms)
            await pipe.execute()

    @_unavailable_on_connection_error
    async def unindex_run(self, response_id: str) -> None:
        await self._client.zrem(self._keys.run_index(), response_id)

    @_unavailable_on_connection_error
    async def due_runs(self, limit: int) -> list[str]:
        reply: list[bytes] = await self._due_script(keys=[self._keys.run_index()], args=[limit])
        return [member.decode() for member in reply]

    @_unavailable_on_connection_error
    async def try_lock(self, name: str, owner: str, *, ttl_ms: int) -> bool:
        return bool(await self._client.set(self._keys.lock(name), owner, nx=True, px=ttl_ms))

    @_unavailable_on_connection_error
    async def unlock(self, name: str, owner: str) -> None:
        await self._unlock_script(keys=[self._keys.lock(name)], args=[owner])

    @_unavailable_on_connection_error
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
            request=fields.get(b"request", b"{}"),
            owner=fields.get(b"owner", b"").decode(),
            lease_until_ms=int(fields.get(b"lease_until", b"0")),
            recovery_count=int(fields.get(b"recovery_count", b"0")),
            tenant=fields.get(b"tenant", b"default").decode(),
        )

    @_unavailable_on_connection_error
    async def get_input_items(self, response_id: str) -> bytes | None:
        value: bytes | None = await self._client.get(self._keys.response_input(response_id))  # type: ignore[assignment]
        return value

    @_unavailable_on_connection_error
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

    @_unavailable_on_connection_error
    async def delete_response(self, response_id: str, *, only_if_finished: bool = True) -> DeleteOutcome:
        keys = self._keys.response_keys(response_id)
        result = await self._delete_script(keys=list(keys), args=[int(only_if_finished)])
        return DeleteOutcome(result.decode().lower())

    @_unavailable_on_connection_error
    async def request_cancel(self, response_id: str) -> str | None:
        channel = self._keys.cancel_channel()
        status = await self._cancel_script(keys=[self._keys.response_state(response_id)], args=[channel, response_id])
        return status.decode() if status else None

    async def cancel_requests(self) -> AsyncIterator[str]:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel())
                while True:
                    _raise_if_cancelling()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_POLL_SECONDS)
                    if message is not None and message.get("type") == "message":
                        yield message["data"].decode()
            except (ConnectionError, OSError, aioredis.RedisError) as error:
                _raise_if_cancelling()
                log.warning("cancel channel lost (%s); resubscribing", error)
                await asyncio.sleep(RESUBSCRIBE_DELAY_SECONDS)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    @_unavailable_on_connection_error
    async def claim_idempotency_key(
        self, scope: str, key: str, *, fingerprint: str, response_id: str, ttl_seconds: int
    ) -> IdempotencyClaim | None:
        claim = _claim_json(IdempotencyClaim(fingerprint, response_id, _now_ms()))
        existing = await self._claim_script(
            keys=[self._keys.idempotency(scope, key)], args=[claim, ttl_seconds * 1000, ""]
        )
        return _parse_claim(existing) if existing else None

    @_unavailable_on_connection_error
    async def replace_idempotency_claim(
        self, scope: str, key: str, *, expected_response_id: str, claim: IdempotencyClaim, ttl_seconds: int
    ) -> bool:
        result = await self._claim_script(
            keys=[self._keys.idempotency(scope, key)],
            args=[_claim_json(claim), ttl_seconds * 1000, expected_response_id],
        )
        return bool(result == b"REPLACED")

    @_unavailable_on_connection_error
    async def release_idempotency_key(self, scope: str, key: str, *, response_id: str) -> None:
        await self._release_script(keys=[self._keys.idempotency(scope, key)], args=[response_id])

    @_unavailable_on_connection_error
    async def refresh_idempotency_key(self, scope: str, key: str, *, ttl_seconds: int) -> None:
        await self._client.pexpire(self._keys.idempotency(scope, key), ttl_seconds * 1000)

    @_unavailable_on_connection_error
    async def create_conversation(
        self,
        conversation_id: str,
        *,
        created_at: int,
        metadata: bytes,
        items: Sequence[tuple[str, bytes]],
        tenant: str = "default",
    ) -> None:
        args: list[bytes | str | int] = [self._ttl_ms, created_at, metadata, tenant, *_pairs(items)]
        keys = list(self._keys.conversation_keys(conversation_id))
        if await self._create_conversation_script(keys=keys, args=args) == b"EXISTS":
            raise ResponseAlreadyExists(conversation_id)

    @_unavailable_on_connection_error
    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        key = self._keys.conversation_keys(conversation_id)[0]
        fields: dict[bytes, bytes] = await self._client.hgetall(key)  # type: ignore[assignment]
        if not fields:
            return None
        return ConversationRecord(
            conversation_id=conversation_id,
            created_at=int(fields[b"created_at"]),
            metadata=fields[b"metadata"],
            active_response_id=fields[b"active"].decode() or None,
            latest_completed_response_id=fields[b"latest"].decode() or None,
            tenant=fields.get(b"tenant", b"default").decode(),
        )

    async def _change_conversation(self, conversation_id: str, action: str, *args: bytes | str) -> bytes:
        keys = list(self._keys.conversation_keys(conversation_id))
        result: bytes = await self._conversation_script(keys=keys, args=[self._ttl_ms, action, *args])
        if result == b"MISSING":
            raise ConversationMissing(conversation_id)
        return result

    @_unavailable_on_connection_error
    async def set_conversation_metadata(self, conversation_id: str, metadata: bytes) -> None:
        await self._change_conversation(conversation_id, "metadata", metadata)

    @_unavailable_on_connection_error
    async def delete_conversation(self, conversation_id: str) -> bool:
        deleted: int = await self._client.delete(*self._keys.conversation_keys(conversation_id))
        return deleted > 0

    @_unavailable_on_connection_error
    async def append_conversation_items(self, conversation_id: str, items: Sequence[tuple[str, bytes]]) -> str | None:
        result = await self._change_conversation(conversation_id, "append", "", *_pairs(items))
        return None if result == b"OK" else result.decode()

    @_unavailable_on_connection_error
    async def begin_conversation_turn(self, conversation_id: str, response_id: str) -> str | None:
        result = await self._change_conversation(conversation_id, "begin", response_id)
        return None if result == b"OK" else result.decode()

    @_unavailable_on_connection_error
    async def end_conversation_turn(
        self, conversation_id: str, response_id: str, *, completed: bool, items: Sequence[tuple[str, bytes]]
    ) -> bool:
        result = await self._change_conversation(
            conversation_id, "end", response_id, "1" if completed else "0", *_pairs(items)
        )
        return result == b"OK"

    @_unavailable_on_connection_error
    async def clear_conversation_turn(self, conversation_id: str, response_id: str) -> bool:
        try:
            return await self._change_conversation(conversation_id, "clear", response_id) == b"OK"
        except ConversationMissing:
            return False

    @_unavailable_on_connection_error
    async def list_conversation_items(
        self, conversation_id: str, *, after: str | None, limit: int, order: str
    ) -> tuple[list[bytes], bool]:
        _, items_key, order_key = self._keys.conversation_keys(conversation_id)
        reply: list[bytes] = await self._list_items_script(
            keys=[items_key, order_key], args=[after or "", limit, order]
        )
        if reply and reply[0] == b"NO_AFTER":
            raise CursorNotFound(after or "")
        return list(reply[1:]), reply[0] == b"1"

    @_unavailable_on_connection_error
    async def get_conversation_item(self, conversation_id: str, item_id: str) -> bytes | None:
        value: bytes | None = await self._client.hget(  # type: ignore[assignment]
            self._keys.conversation_keys(conversation_id)[1], item_id
        )
        return value

    @_unavailable_on_connection_error
    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        return await self._change_conversation(conversation_id, "delete_item", item_id) == b"OK"

    def open_event_feed(self) -> RedisEventFeed:
        return RedisEventFeed(self._client, self._keys)

    @_unavailable_on_connection_error
    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)


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

    @_unavailable_on_connection_error
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
            _raise_if_cancelling()
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
        await self._reader.aclose(close_connection_pool=True)
