"""SSE writing: what a client receives when the event source breaks part-way through a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.sse import StreamSettings, open_stream, write_events
from storage.base import StoredEvent
from tests.helpers import read_frames

SETTINGS = StreamSettings(heartbeat_seconds=15, retry_ms=1000, write_timeout_seconds=10)
RESPONSE = {
    "id": "resp_broken",
    "object": "response",
    "created_at": 1,
    "model": "sim-1",
    "output": [],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "status": "in_progress",
}


def lifecycle_event(seq: int, kind: str) -> StoredEvent:
    return StoredEvent(seq, kind, orjson.dumps({"type": kind, "sequence_number": seq, "response": RESPONSE}))


async def broken_source() -> AsyncIterator[list[StoredEvent] | None]:
    yield [lifecycle_event(0, "response.created"), lifecycle_event(1, "response.in_progress")]
    raise RuntimeError("the store went away")


async def stream_that_breaks(request: web.Request) -> web.StreamResponse:
    response = await open_stream(request, SETTINGS)
    await write_events(request, response, broken_source(), SETTINGS)
    return response


async def test_a_broken_stream_ends_with_an_error_that_takes_no_number_of_the_log() -> None:
    app = web.Application()
    app.router.add_post("/v1/responses", stream_that_breaks)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/responses") as raw:
            frames = await read_frames(raw)
        assert [frame.event for frame in frames] == ["response.created", "response.in_progress", "error"]
        error = frames[-1]
        # 2 is the number the store gives the next real event: the error must not claim it (nor any other).
        assert error.id is None
        assert error.data == {
            "type": "error",
            "code": "server_error",
            "message": "The event stream was interrupted; reconnect.",
            "param": None,
        }

        # The SDK hands it over as an event, not an exception.
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)
        try:
            stream = await client.responses.create(model="sim-1", input="hi", stream=True)
            events = [event async for event in stream]
        finally:
            await client.close()
        assert [(event.type, event.sequence_number) for event in events] == [
            ("response.created", 0),
            ("response.in_progress", 1),
            ("error", None),
        ]
    finally:
        await server.close()
