"""What in-process gateways send, checked against the SDK's models made strict (tests/strict_models.py).

Every test that serves a gateway in this process has every JSON body, every SSE event and every WebSocket frame
the gateway wrote validated after the test, whichever client read them (the SDK, raw aiohttp, a deliberately broken
client). The bytes are taken where aiohttp's server writes them (and where gateway/sse.DirectWrites writes an event
to a stream's socket itself), so nothing a client does can hide a malformed event.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydantic
from aiohttp import WSMsgType, web

from gateway.sse import DirectWrites
from gateway.state import STORE
from tests.strict_models import body_model, check_event, check_ws_event, conversation_item_model

_CONVERSATION_ITEM_PATH = re.compile(r"^/v1/conversations/[^/]+/items/[^/]+$")


@dataclass
class _Written:
    response: web.StreamResponse  # held until checked: its id() must not be reused by a later response
    method: str
    path: str
    status: int
    content_type: str
    data: bytearray = field(default_factory=bytearray)
    frames: list[tuple[WSMsgType, bytes]] = field(default_factory=list)  # a WebSocket's data frames, in order


@dataclass
class WireCheck:
    """The bodies gateways wrote during one test, and what was wrong with them."""

    written: dict[int, _Written] = field(default_factory=dict)
    event_types: set[str] = field(default_factory=set)
    ws_event_types: set[str] = field(default_factory=set)
    bodies_checked: int = 0

    def record(self, response: web.StreamResponse, data: bytes) -> None:
        written = self._written(response)
        if written is not None:
            written.data += data

    def record_frame(self, socket: web.WebSocketResponse, data: bytes, opcode: WSMsgType) -> None:
        """One data frame a WebSocket sent (control frames, pings and the close, are aiohttp's, not the gateway's)."""
        if opcode not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return
        written = self._written(socket)
        if written is not None:
            written.frames.append((opcode, data))

    def _written(self, response: web.StreamResponse) -> _Written | None:
        request = getattr(response, "_req", None)
        # A BaseRequest (aiohttp's own answer to what is not valid HTTP) has no app: not the gateway's writing.
        if not isinstance(request, web.Request) or STORE not in request.app:
            return None  # not a gateway (the simulator, a test's own server)
        written = self.written.get(id(response))
        if written is None:
            written = self.written[id(response)] = _Written(
                response, request.method, request.path, response.status, response.content_type
            )
        return written

    def problems(self) -> list[str]:
        """Everything written that a strict client would refuse; forgets what it checked."""
        found: list[str] = []
        for written in self.written.values():
            found.extend(self._check(written))
        self.written.clear()
        return found

    def _check(self, written: _Written) -> Iterator[str]:
        if isinstance(written.response, web.WebSocketResponse):
            yield from self._check_frames(written)
            return
        where = f"{written.method} {written.path} ({written.status})"
        if written.content_type == "text/event-stream":
            for event in _complete_events(bytes(written.data)):
                self.event_types.add(str(event.get("type")))
                try:
                    check_event(event)
                except (pydantic.ValidationError, KeyError) as error:
                    yield f"{where}: event {event.get('type')} #{event.get('sequence_number')}: {_short(error)}"
            return
        if written.content_type != "application/json" or written.status >= 400:
            return  # error envelopes are checked by the tests that provoke them
        try:
            body = orjson.loads(written.data)
        except orjson.JSONDecodeError:
            yield f"{where}: a JSON body that does not parse"
            return
        model: Any = None
        if isinstance(body, dict):
            model = body_model(written.path, body)
            if model is None and written.method == "GET" and _CONVERSATION_ITEM_PATH.match(written.path):
                model = conversation_item_model()
        if model is None:
            return
        self.bodies_checked += 1
        try:
            if isinstance(model, pydantic.TypeAdapter):
                model.validate_python(body)
            else:
                model.model_validate(body)
        except pydantic.ValidationError as error:
            yield f"{where}: body {body.get('object')}: {_short(error)}"

    def _check_frames(self, written: _Written) -> Iterator[str]:
        """Each frame must be one JSON server event of the SDK's `ResponsesServerEvent` union, in a text frame."""
        where = f"{written.method} {written.path} (WS)"
        for number, (opcode, data) in enumerate(written.frames, 1):
            if opcode is not WSMsgType.TEXT:
                yield f"{where}: frame {number}: a {opcode.name.lower()} frame, not a text frame"
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                yield f"{where}: frame {number}: text that is not JSON"
                continue
            if not isinstance(event, dict):
                yield f"{where}: frame {number}: JSON that is not an object"
                continue
            self.ws_event_types.add(str(event.get("type")))
            try:
                check_ws_event(event)
            except (pydantic.ValidationError, KeyError) as error:
                yield f"{where}: event {event.get('type')} #{event.get('sequence_number')}: {_short(error)}"


def _short(error: pydantic.ValidationError | KeyError) -> str:
    if isinstance(error, KeyError):
        return str(error)
    return "; ".join(
        f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors(include_url=False)[:6]
    )


def _complete_events(stream: bytes) -> Iterator[dict[str, Any]]:
    """The JSON of each complete SSE frame in `stream` (a cut-off last frame is left out)."""
    frames = stream.split(b"\n\n")
    for frame in frames[:-1]:
        data = b"\n".join(line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            continue
        event = orjson.loads(data)
        if isinstance(event, dict):
            yield event


@contextlib.contextmanager
def recording(check: WireCheck) -> Iterator[None]:
    """Tee what aiohttp's server writes into `check` while the block runs: bodies (with the events DirectWrites
    writes), and WebSocket frames."""
    original_write, original_write_eof = web.StreamResponse.write, web.StreamResponse.write_eof
    original_send_frame = web.WebSocketResponse.send_frame
    original_direct_write = DirectWrites.write

    async def write(self: web.StreamResponse, data: bytes | bytearray | memoryview) -> None:
        check.record(self, bytes(data))
        await original_write(self, data)

    async def write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        if data and not self._eof_sent:  # a web.Response passes its body here, once
            check.record(self, bytes(data))
        await original_write_eof(self, data)

    async def send_frame(
        self: web.WebSocketResponse[Any], message: bytes, opcode: WSMsgType, compress: int | None = None
    ) -> None:
        check.record_frame(self, bytes(message), opcode)
        await original_send_frame(self, message, opcode, compress)

    def direct_write(self: DirectWrites, body: bytes) -> bool:  # events written in the step that stored them
        written = original_direct_write(self, body)
        if written and self.response is not None:
            check.record(self.response, body)
        return written

    web.StreamResponse.write = write  # type: ignore[method-assign]
    web.StreamResponse.write_eof = write_eof  # type: ignore[method-assign]
    web.WebSocketResponse.send_frame = send_frame  # type: ignore[method-assign]
    DirectWrites.write = direct_write  # type: ignore[method-assign]
    try:
        yield
    finally:
        DirectWrites.write = original_direct_write  # type: ignore[method-assign]
        web.StreamResponse.write = original_write  # type: ignore[method-assign]
        web.StreamResponse.write_eof = original_write_eof  # type: ignore[method-assign]
        web.WebSocketResponse.send_frame = original_send_frame  # type: ignore[method-assign]
