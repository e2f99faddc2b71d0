"""Server-sent events: framing stored events and writing them to a client that may go away at any moment."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web

from runs.live import SubscriberOverflow
from storage.base import StoredEvent

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise buffer the stream
}

# A comment line alone, with no blank line after it. WHATWG parsers ignore it either way, but a blank line would
# dispatch an event: the openai SDK's decoder keeps the last `id:` across events, so `: keep-alive\n\n` after an
# event with an id becomes an event with empty data, which the SDK then fails to parse as JSON.
HEARTBEAT = b": keep-alive\n"


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat_seconds: float
    retry_ms: int


def event_frame(event: StoredEvent, *, retry_ms: int | None = None) -> bytes:
    """`event:`, `id:` (the sequence number, for Last-Event-ID) and `data:` lines. The stored JSON has no raw
    newline (JSON escapes them), so it is always one `data:` line and model text cannot forge a frame."""
    retry = b"retry: %d\n" % retry_ms if retry_ms is not None else b""
    return b"event: %s\nid: %d\n%sdata: %s\n\n" % (event.type.encode(), event.sequence_number, retry, event.data)


def error_frame(code: str, message: str, sequence_number: int) -> bytes:
    """A flat `error` event, the shape the SDK raises APIError for."""
    payload = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": sequence_number}
    return b"event: error\ndata: %s\n\n" % orjson.dumps(payload)


async def open_stream(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Send the SSE response headers."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    return response


def cut_off(request: web.Request) -> None:
    """Drop a subscriber's connection now, discarding what is buffered for it (it fell too far behind)."""
    if request.transport is not None:
        request.transport.abort()


async def write_events(
    response: web.StreamResponse, events: AsyncIterator[StoredEvent | None], settings: StreamSettings
) -> None:
    """Write events as they come (None means idle: send a heartbeat), then end the body. A client that went away
    or fell behind just stops receiving: no terminal event is invented for it, it reconnects with its cursor."""
    retry_ms: int | None = settings.retry_ms
    last = -1
    try:
        async for event in events:
            if event is None:
                await response.write(HEARTBEAT)
                continue
            await response.write(event_frame(event, retry_ms=retry_ms))
            retry_ms = None
            last = event.sequence_number
    except (ConnectionResetError, SubscriberOverflow) as gone:
        log.debug("subscriber left or was cut off after %d: %s", last, type(gone).__name__)
        return
    except Exception:
        log.exception("event stream broke after %d", last)
        try:
            await response.write(error_frame("server_error", "The event stream was interrupted; reconnect.", last + 1))
        except ConnectionResetError:
            return
    try:
        await response.write_eof()
    except ConnectionResetError:
        return
