"""Server-sent events: framing stored events and writing them to a client that may go away at any moment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from gateway.metrics import StreamClock, stream_clock
from runs.errors import EventsLost
from runs.status import TERMINAL_EVENT_TYPES
from runs.store import StoredEvent

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
    write_timeout_seconds: float
    socket_send_buffer_bytes: int = 0


def event_frame(event: StoredEvent) -> bytes:
    """`event:`, `id:` and `data:` lines. The id, `<sequence number>.<epoch>`, is what a reconnecting client sends
    back as Last-Event-ID: the epoch (of the lease its writer held) tells which event of that number the client
    has, so one that a store failover lost and a later owner replaced is recognised (runs/subscription.py). The
    stored JSON has no raw newline (JSON escapes them), so it is always one `data:` line and model text cannot
    forge a frame. The same event is the same bytes on every stream, on every instance."""
    return b"event: %s\nid: %d.%d\ndata: %s\n\n" % (
        event.type.encode(),
        event.sequence_number,
        event.epoch,
        event.data,
    )


def event_frames(events: Sequence[StoredEvent]) -> bytes:
    """The frames of `events`, for one write (at a model's pace, one event)."""
    return event_frame(events[0]) if len(events) == 1 else b"".join([event_frame(event) for event in events])


def retry_preamble(retry_ms: int) -> bytes:
    """`retry:` alone on a line before the first event: it sets the client's reconnect delay. No blank line
    follows it (that would dispatch an empty event), so parsers read it as part of the next frame."""
    return b"retry: %d\n" % retry_ms


def error_frame(code: str, message: str) -> bytes:
    """A flat `error` event for this connection only. It is not in the response's log, so it takes none of the
    log's numbers: no `id:` line (Last-Event-ID stays on the last real event, where a reconnect resumes) and no
    `sequence_number` (it once carried `last + 1`, the number the store then gives the next real event)."""
    # Omitting the field is what the openai SDK copes with best (checked with 3.57): `responses.create(stream=True)`
    # and `responses.stream()` yield an ErrorEvent with sequence_number None. Only `responses.stream(response_id=…,
    # starting_after=N)` then raises (a TypeError comparing None with N), which still ends that stream with an
    # exception. A repeated or negative number is a log number or gets the error dropped silently by that helper;
    # a truthy top-level `error` key would make every SDK path raise APIError instead of yielding the flat event.
    payload = {"type": "error", "code": code, "message": message, "param": None}
    return b"event: error\ndata: %s\n\n" % orjson.dumps(payload)


class _HeadersWithFirstEvents(web.StreamResponse):
    """A stream whose headers go out in the same write as its first events (aiohttp's `web.Response` buffers
    them this way too): one syscall less per stream, for a stream whose first events are at hand."""

    _send_headers_immediately = False


async def open_stream(
    request: web.Request,
    settings: StreamSettings,
    headers: dict[str, str] | None = None,
    *,
    events_at_hand: bool = False,
) -> web.StreamResponse:
    """Start the SSE response: its headers are sent now, or with the first write when `events_at_hand` (the
    caller is about to write). A fixed send buffer, when configured, caps what the kernel holds for a client that
    stops reading (autotuning lets it grow to megabytes)."""
    if settings.socket_send_buffer_bytes and request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    kind = _HeadersWithFirstEvents if events_at_hand else web.StreamResponse
    response = kind(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    return response


class _StallWatch:
    """Cuts off a client whose writes have not gone through for `timeout` seconds: its socket buffers are full
    and it is not reading. One timer per stream, re-armed at each write, instead of a timeout around every write."""

    def __init__(self, request: web.Request, timeout: float) -> None:
        self._request = request
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._writing_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.cut = False

    def writing(self) -> None:
        self._writing_since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check)

    def written(self) -> None:
        self._writing_since = None

    def _check(self) -> None:
        self._timer = None
        if self._writing_since is None:
            return
        stalled_for = self._loop.time() - self._writing_since
        if stalled_for < self._timeout:
            self._timer = self._loop.call_later(self._timeout - stalled_for, self._check)
            return
        self.cut = True
        if self._request.transport is not None:
            self._request.transport.abort()  # drops what is buffered for it: memory stays bounded

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class DirectWrites:
    """Writes events to the client in the step of whoever has just stored them (a run, through the live fan-out:
    `follow_events`' `direct`), in one write, instead of waking the stream's writer task for them: at a model's
    pace that was a task wake-up and a resumption through the follower for every delta. The storing step pays one
    write per such subscriber, never a wait.

    Only once the writer task has written (the headers and the reconnect preamble are out) and until it ends; only
    while the socket has taken everything so far (a client that is not keeping up is written to by the writer
    task, which waits for the socket and is cut off when stalled); only with the framing aiohttp itself would use
    (chunked or plain, never compressed or length-bound), counted in what the response wrote."""

    __slots__ = ("_clock", "_request", "_transport", "_writer", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._writer: StreamWriter | None = None
        # The connection's transport, looked up once (aiohttp's `request.transport` is a property of properties).
        self._transport: asyncio.Transport | None = None
        self._clock: StreamClock | None = None
        self.response: web.StreamResponse | None = None

    def start(self, response: web.StreamResponse, clock: StreamClock) -> None:
        """The writer task has written to the client: events may go directly from now on."""
        writer = self._request.writer
        transport = self._request.transport
        if (
            isinstance(writer, StreamWriter)
            and transport is not None
            and not response.compression
            and writer.length is None
            and writer.on_body_write is None
        ):
            self._writer, self._transport, self._clock, self.response = writer, transport, clock, response

    def stop(self) -> None:
        self._writer = self._transport = self._clock = None

    def __call__(self, events: Sequence[StoredEvent]) -> bool:
        clock = self._clock
        if clock is None:
            return False
        if not self.write(event_frames(events)):
            return False
        try:
            clock.written(events)
        except Exception:  # written: the events must count as taken, or they would be sent again
            log.exception("stream clock failed")
        return True

    def write(self, body: bytes) -> bool:
        """Write `body` (what `response.write` would be given) to the client now, if it can go directly."""
        writer, transport = self._writer, self._transport
        if writer is None or transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        data = b"%x\r\n%b\r\n" % (len(body), body) if writer.chunked else body
        try:
            transport.write(data)
        except (ConnectionError, RuntimeError):  # nothing written: the writer task meets the client's end itself
            return False
        # Counted as aiohttp counts its own writes: the writer task's next write waits for the socket once 64 KiB
        # have gone out without a wait, direct ones included.
        writer.buffer_size += len(data)
        writer.output_size += len(data)
        return True


async def write_events(
    request: web.Request,
    response: web.StreamResponse,
    events: AsyncIterator[list[StoredEvent] | None],
    settings: StreamSettings,
    direct: DirectWrites | None = None,
) -> None:
    """Write batches of events as they come (None means idle: send a heartbeat), then end the body. A client
    that went away or stopped reading just stops receiving: no terminal event is invented for it, it reconnects
    with its cursor.

    The writing runs in a task of its own, which the handler waits for: the writer is woken once per event at a
    model's pace, and a task resumes through every frame it awaits in. Under the handler that is the whole
    middleware stack (about fifteen frames); in its own task, two. A cancelled handler (shutdown, a client gone
    with handler cancellation on) cancels the task it awaits, and wakes once the writer has ended.

    `direct`, the one given to the events' follower, if any: the writer lets it write once it has written."""
    await asyncio.ensure_future(_write_events(request, response, events, settings, direct))


async def _write_events(
    request: web.Request,
    response: web.StreamResponse,
    events: AsyncIterator[list[StoredEvent] | None],
    settings: StreamSettings,
    direct: DirectWrites | None,
) -> None:
    last = -1
    watch = _StallWatch(request, settings.write_timeout_seconds)
    clock = stream_clock(request)

    to_start = direct

    async def send(frame: bytes) -> None:
        nonlocal to_start
        watch.writing()
        await response.write(frame)
        watch.written()
        if to_start is not None:
            to_start.start(response, clock)
            to_start = None

    # Goes out with the first write: what a client needs before any event, not a write of its own.
    preamble = retry_preamble(settings.retry_ms)
    final = b""
    final_batch: list[StoredEvent] = []
    try:
        async for batch in events:
            if batch is None:
                await send(preamble + HEARTBEAT)
                preamble = b""
                continue
            # One write for everything at hand: a syscall per event was the largest single cost at the ceiling.
            frames = event_frames(batch)
            if preamble:
                frames, preamble = preamble + frames, b""
            if batch[-1].type in TERMINAL_EVENT_TYPES:
                final, final_batch = frames, batch  # the stream ends with it: written with the end of the body
                last = batch[-1].sequence_number
                break
            await send(frames)
            clock.written(batch)
            last = batch[-1].sequence_number
        watch.writing()
        await response.write_eof(preamble + final)
        if final_batch:
            clock.written(final_batch)
    except asyncio.CancelledError:  # the client left (aiohttp cancels its handler)
        clock.dropped("stalled" if watch.cut else "disconnected")
        raise
    except ConnectionResetError:
        clock.dropped("stalled" if watch.cut else "disconnected")
        log.debug("subscriber gone after %d (cut off for stalling: %s)", last, watch.cut)
    except EventsLost as error:
        clock.dropped("events_lost")
        log.warning("event stream ended after %d: %s", last, error.message)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof(error_frame(error.code or "events_lost", error.message))
    except Exception:
        clock.dropped("error")
        log.exception("event stream broke after %d", last)
        try:
            await response.write_eof(error_frame("server_error", "The event stream was interrupted; reconnect."))
        except ConnectionResetError:
            return
    finally:
        watch.stop()
        if direct is not None:
            direct.stop()
