"""Server-sent events: framing stored events and writing them to a client that may go away at any moment."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from storage.base import StoredEvent

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise buffer the stream
}


def event_frame(event: StoredEvent) -> bytes:
    """`event:`, `id:` (the sequence number, for Last-Event-ID) and `data:` lines. The stored JSON has no raw
    newline (JSON escapes them), so it is always one `data:` line and model text cannot forge a frame."""
    return b"event: %s\nid: %d\ndata: %s\n\n" % (event.type.encode(), event.sequence_number, event.data)


def error_frame(code: str, message: str, sequence_number: int) -> bytes:
    """A flat `error` event, the shape the SDK raises APIError for."""
    payload = {
        "type": "error",
        "code": code,
        "message": message,
        "param": None,
        "sequence_number": sequence_number,
    }
    return b"event: error\ndata: %s\n\n" % orjson.dumps(payload)


async def open_stream(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Send the SSE response headers."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    return response


async def write_events(response: web.StreamResponse, events: AsyncIterator[StoredEvent]) -> int:
    """Write each event as it comes; return the last sequence number written (-1 if none). A write to a
    client that went away raises ConnectionResetError, which the caller treats as a disconnect."""
    last = -1
    async for event in events:
        await response.write(event_frame(event))
        last = event.sequence_number
    return last
