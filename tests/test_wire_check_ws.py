"""The WebSocket half of the wire check (tests/wire_check.py) refuses what a strict client refuses: every frame an
in-process gateway sends must be one of the SDK's `ResponsesServerEvent`s, made strict. Otherwise a green suite
would prove nothing about WebSocket mode."""

from __future__ import annotations

from typing import Any, cast

import aiohttp
import orjson
import pydantic
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer, make_mocked_request

from gateway.state import STORE
from tests.strict_models import check_ws_event
from tests.wire_check import WireCheck, recording

_DELTA: dict[str, Any] = {
    "type": "response.output_text.delta",
    "item_id": "msg_1",
    "output_index": 0,
    "content_index": 0,
    "delta": "x",
    "logprobs": [],
    "sequence_number": 3,
}
_ERROR: dict[str, Any] = {
    "type": "error",
    "status": 400,
    "error": {"type": "invalid_request_error", "message": "no", "code": "invalid_json", "param": None},
}
_STEER_FAILED: dict[str, Any] = {
    "type": "response.steer.failed",
    "sequence_number": 1,
    "stream_id": "lane-a",
    "steer": {"id": "steer_1", "input": "hi", "previous_response_id": "resp_1"},
    "error": {"type": "invalid_request_error", "code": "response_already_completed", "message": "too late"},
}


def _app(*, gateway: bool = True) -> web.Application:
    app = web.Application()
    if gateway:
        app[STORE] = cast(Any, object())  # all the check looks at: the app is a gateway's
    return app


def _socket(app: web.Application) -> web.WebSocketResponse:
    """A WebSocket response as a gateway's handler holds it once prepared (prepare() sets its request)."""
    socket = web.WebSocketResponse()
    socket._req = make_mocked_request("GET", "/v1/responses", app=app)
    return socket


def test_events_on_a_socket_are_checked_by_their_type() -> None:
    check_ws_event(_DELTA)
    check_ws_event({**_DELTA, "stream_id": "lane-a"})
    check_ws_event(_ERROR)  # a socket's error need not belong to a response's log
    check_ws_event({**_ERROR, "sequence_number": 4, "stream_id": "lane-a"})
    check_ws_event(_STEER_FAILED)


@pytest.mark.parametrize(
    "event",
    [
        {key: value for key, value in _DELTA.items() if key != "item_id"},
        {**_DELTA, "stream_id": None},  # when there is no lane the field is left out
        {**_DELTA, "stream_id": 7},
        {**_DELTA, "surprise": 1},
        {**_DELTA, "sequence_number": "3"},  # no coercion
        {key: value for key, value in _DELTA.items() if key != "sequence_number"},  # only `error` may go without
    ],
)
def test_the_socket_models_refuse_what_strict_clients_refuse(event: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        check_ws_event(event)


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(KeyError):
        check_ws_event({"type": "response.made_up", "sequence_number": 1})


def test_the_wire_check_reports_the_spoiled_frames_only() -> None:
    check = WireCheck()
    socket = _socket(_app())
    spoiled = {key: value for key, value in _DELTA.items() if key != "item_id"}
    for event in (_DELTA, spoiled, {**_DELTA, "sequence_number": 4, "stream_id": "lane-a"}):
        check.record_frame(socket, orjson.dumps(event), WSMsgType.TEXT)
    check.record_frame(socket, orjson.dumps({"type": "response.made_up", "sequence_number": 5}), WSMsgType.TEXT)
    check.record_frame(socket, orjson.dumps({**_DELTA, "sequence_number": 6, "stream_id": None}), WSMsgType.TEXT)
    check.record_frame(socket, b"{not json", WSMsgType.TEXT)
    check.record_frame(socket, orjson.dumps(_DELTA), WSMsgType.BINARY)
    check.record_frame(socket, b"", WSMsgType.PING)  # aiohttp's own control frames are not the gateway's

    problems = check.problems()

    where = "GET /v1/responses (WS)"
    assert problems == [
        f"{where}: event response.output_text.delta #3: item_id: Field required",
        f"{where}: event response.made_up #5: \"unknown event type 'response.made_up'\"",
        f"{where}: event response.output_text.delta #6: stream_id: Input should be a valid string",
        f"{where}: frame 6: text that is not JSON",
        f"{where}: frame 7: a binary frame, not a text frame",
    ]
    assert check.ws_event_types == {"response.output_text.delta", "response.made_up"}
    assert check.problems() == []  # what was checked is forgotten


def test_a_socket_that_is_not_a_gateways_is_not_checked() -> None:
    check = WireCheck()
    check.record_frame(_socket(_app(gateway=False)), b"{not json", WSMsgType.TEXT)
    assert check.written == {}
    assert check.problems() == []


async def test_recording_tees_the_frames_a_socket_sends(wire_check: WireCheck) -> None:
    """Through a real server (a stand-in with the gateway's app key, not a gateway): `recording` takes each
    frame where aiohttp's `send_frame` sends it, whatever the client then makes of it."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_frame(orjson.dumps({**_DELTA, "stream_id": "lane-a"}), WSMsgType.TEXT)
        await socket.send_frame(orjson.dumps({"type": "response.made_up"}), WSMsgType.TEXT)
        await socket.close()
        return socket

    app = _app()
    app.router.add_get("/v1/responses", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    check = WireCheck()
    try:
        with recording(check):
            async with aiohttp.ClientSession() as session, session.ws_connect(server.make_url("/v1/responses")) as ws:
                received = [message.data async for message in ws]
    finally:
        await server.close()
    wire_check.problems()  # the session's check saw the same frames: the spoiled one is this test's own

    assert len(received) == 2
    assert check.problems() == [
        "GET /v1/responses (WS): event response.made_up #None: \"unknown event type 'response.made_up'\""
    ]
