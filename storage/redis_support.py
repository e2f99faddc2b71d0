"""What the Redis modules share: error translation, Lua loading, argument packing, cancellation safety."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import orjson
from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.base import (
    IdempotencyClaim,
    StoredEvent,
    StoreUnavailable,
)
from storage.keys import event_entry_id
from storage.status import lua_preamble

log = logging.getLogger(__name__)

# How long to wait before re-subscribing after the pub/sub connection failed.
RESUBSCRIBE_DELAY_SECONDS = 1.0


# What means "the store could not be reached, or not answer now": a lost or refused connection, a timeout, and on
# a cluster a slot without a master for now (a failover in progress), a slot being moved, no node reachable.
UNAVAILABLE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,  # no node reachable, slots not all covered (SlotNotCoveredError is one)
)

# How often the pub/sub loop wakes up without a message (to notice a cancellation redis-py swallowed).
PUBSUB_POLL_SECONDS = 1.0


def raise_if_cancelling() -> None:
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


def unavailable_on_connection_error(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Turn redis-py's connection and timeout errors into the storage contract's StoreUnavailable."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except UNAVAILABLE_ERRORS as error:
            raise StoreUnavailable(f"redis: {error}") from error

    return wrapper


def item_pairs(items: Sequence[tuple[str, bytes]]) -> list[bytes | str]:
    flat: list[bytes | str] = []
    for item_id, item in items:
        flat += (item_id, item)
    return flat


def now_ms() -> int:
    return int(time.time() * 1000)


def claim_json(claim: IdempotencyClaim) -> bytes:
    return orjson.dumps(
        {"fingerprint": claim.fingerprint, "response_id": claim.response_id, "claimed_at_ms": claim.claimed_at_ms}
    )


def parse_claim(raw: bytes) -> IdempotencyClaim:
    data = orjson.loads(raw)
    return IdempotencyClaim(data["fingerprint"], data["response_id"], int(data["claimed_at_ms"]))


def load_lua(name: str) -> str:
    """A script with the status vocabulary prepended (no script spells a status itself)."""
    return lua_preamble() + (resources.files("storage") / "lua" / name).read_text(encoding="utf-8")


def event_args(events: Sequence[StoredEvent], epoch: int = 1) -> list[bytes | str]:
    """(entry id, type, data) of each event, written under lease `epoch`."""
    args: list[bytes | str] = []
    for event in events:
        args += (event_entry_id(event.sequence_number, epoch), event.type, event.data)
    return args


def parse_entries(entries: list[Any]) -> list[StoredEvent]:
    """Stream entries as StoredEvents. Written for speed: a replay parses thousands per page."""
    events: list[StoredEvent] = []
    append = events.append
    types = _EVENT_TYPES
    for entry_id, fields in entries:
        epoch, _, sequence_number = entry_id.partition(b"-")
        if type(fields) is list:  # a raw reply: the flat field list, in the order XADD wrote it
            raw_type, data = fields[1], fields[3]
        else:
            raw_type, data = fields[b"t"], fields[b"d"]
        kind = types.get(raw_type) or event_type(raw_type)
        append(StoredEvent(int(sequence_number), kind, data, int(epoch)))
    return events


_EVENT_TYPES: dict[bytes, str] = {}


def event_type(raw: bytes) -> str:
    """The event type as one shared string per type (a few dozen types, millions of events)."""
    found = _EVENT_TYPES.get(raw)
    if found is None:
        found = sys.intern(raw.decode())
        if len(_EVENT_TYPES) < 1024:
            _EVENT_TYPES[raw] = found
    return found
