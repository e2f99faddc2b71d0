"""The bench's light SSE client: one raw aiohttp POST per stream, frames split at blank lines, and of each event
only its type read, by a bytes search rather than JSON parsing, so the client costs little next to what it measures
(the openai SDK builds a pydantic model per event and saturates a core on its own)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

DELTA = b"response.output_text.delta"
COMPLETED = b"response.completed"
TERMINAL_EVENTS = frozenset({COMPLETED, b"response.incomplete", b"response.failed", b"error"})
# The first "type" of a data line. LiteLLM and the simulator put it first, so it is the event's own type; a
# provider that put it last would show a nested one ("message", "text"), which `event_type` sends to JSON instead.
_DATA_TYPE = re.compile(rb'"type":\s*"([^"\\]+)"')
_LF = 0x0A


def event_type(frame: bytes) -> bytes | None:
    """The type of one SSE frame (the text between two blank lines): its `event:` line when it has one (the
    gateway and the simulator send it), else the `type` of its `data:` JSON. None for a frame without data (a
    comment, a `retry:` alone) and for LiteLLM's closing `data: [DONE]`."""
    data_at = frame.find(b"data:")
    if data_at < 0:
        return None
    event_at = frame.find(b"event:", 0, data_at)
    if event_at >= 0 and (event_at == 0 or frame[event_at - 1] == _LF):
        return frame[event_at + 6 : frame.index(b"\n", event_at)].strip()
    match = _DATA_TYPE.search(frame, data_at)
    if match is not None and (match.group(1).startswith(b"response.") or match.group(1) == b"error"):
        return match.group(1)
    data = frame[data_at + 5 :].strip()
    if data == b"[DONE]":
        return None
    try:
        return str(orjson.loads(data).get("type", "?")).encode()
    except (orjson.JSONDecodeError, AttributeError):
        return b"?"


def _error_detail(kind: bytes, frame: bytes) -> str:
    """What a failing terminal event says (only these few frames are parsed as JSON)."""
    try:
        payload = orjson.loads(frame[frame.index(b"data:") + 5 :])
    except (ValueError, orjson.JSONDecodeError):
        return f"{kind.decode()} event"
    if kind == b"error":
        return f"error event: {payload.get('message') or payload.get('error', '')}"[:120]
    response = payload.get("response") or {}
    error = response.get("error") or {}
    return f"{kind.decode()} ({response.get('status')}): {error.get('message', '')}"[:120]


@dataclass
class StreamRecord:
    """What one client saw on one stream (filled in as events arrive, so a cancelled stream keeps its data)."""

    started: float = 0.0
    first_delta: float | None = None
    last_delta: float | None = None
    ended: float | None = None
    deltas: int = 0
    events: int = 0
    gaps: list[float] = field(default_factory=list)
    terminal: str | None = None
    error: str | None = None


def error_label(error: BaseException) -> str:
    """A short, countable description of a failure."""
    if isinstance(error, HttpStatusError):
        return str(error)
    if isinstance(error, asyncio.CancelledError):
        return "workload deadline"
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        return "client timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"connection error: {type(error).__name__}"
    if isinstance(error, aiohttp.ClientError):
        return f"connection error: {type(error).__name__}: {str(error)[:80]}"
    return f"{type(error).__name__}: {str(error)[:120]}"


class HttpStatusError(Exception):
    """A non-200 answer, labelled with its status and the start of its body."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:120]}")
        self.status = status


async def post_stream(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    record: StreamRecord,
    *,
    stop_at: float | None = None,
    on_event: Callable[[float], None] | None = None,
) -> None:
    """POST `body` and read the SSE answer to its end (or to `stop_at`, perf_counter time), recording into
    `record`. Every frame of a chunk gets the chunk's arrival time. Errors are recorded, never raised."""
    record.started = time.perf_counter()
    try:
        async with http.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                raise HttpStatusError(response.status, await response.text())
            carry = b""
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                if stop_at is not None and now >= stop_at:
                    break
                frames = (carry + chunk).split(b"\n\n")
                carry = frames.pop()
                for frame in frames:
                    kind = event_type(frame)
                    if kind is None or record.terminal is not None:
                        continue  # after the terminal event only [DONE] or the end of the body is expected
                    record.events += 1
                    if on_event is not None:
                        on_event(now)
                    if kind == DELTA:
                        record.deltas += 1
                        if record.last_delta is None:
                            record.first_delta = now
                        else:
                            record.gaps.append(now - record.last_delta)
                        record.last_delta = now
                    elif kind in TERMINAL_EVENTS:
                        record.terminal = kind.decode()
                        record.ended = now
                        if kind != COMPLETED:
                            record.error = _error_detail(kind, frame)
    except BaseException as error:
        record.error = error_label(error)
        if isinstance(error, asyncio.CancelledError):
            raise
    finally:
        if record.ended is None:
            record.ended = time.perf_counter()


async def count_frames(http: aiohttp.ClientSession, url: str) -> int:
    """GET an SSE body to its last byte and count its frames (each ends with a blank line)."""
    frames = 0
    carry = b""
    async with http.get(url) as response:
        if response.status != 200:
            raise HttpStatusError(response.status, await response.text())
        async for chunk in response.content.iter_any():
            data = carry + chunk
            frames += data.count(b"\n\n")
            carry = data[-1:]
    return frames
