"""The simulated model server, driven by the official openai client as the gateway would drive it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from runs.simulator import (
    SimulatorSettings,
    create_simulator_app,
    input_text_of,
    run_simulator,
    simulated_text,
)

EVENT_ADAPTER: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
HAPPY_PATH_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 20,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def server(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(create_simulator_app(SimulatorSettings(token_delay_ms=1, ttft_ms=1)))


@pytest.fixture
async def client(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: each fault must reach the test exactly once.
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http(server: TestServer) -> AsyncIterator[ClientSession]:
    async with ClientSession(base_url=server.make_url("/")) as session:
        yield session


async def sse_events(http: ClientSession, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streaming request and parse the raw frames, checking each `event:` line matches its JSON."""
    async with http.post("/v1/responses", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    events = []
    for frame in raw.split("\n\n")[:-1]:
        event_line, data_line = frame.split("\n")
        event = orjson.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
        events.append(event)
    return events


async def stats(http: ClientSession) -> dict[str, Any]:
    async with http.get("/sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def wait_for_stats(http: ClientSession, **expected: int) -> dict[str, Any]:
    deadline = time.monotonic() + 2
    while True:
        current = await stats(http)
        if all(current[key] == value for key, value in expected.items()) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.01)


def test_simulated_text_is_deterministic_words_ending_in_a_period() -> None:
    tokens = simulated_text("hello", 7)
    assert len(tokens) == 7
    assert tokens == simulated_text("hello", 7)
    assert tokens != simulated_text("hello!", 7)
    assert all(token.startswith(" ") for token in tokens[1:])
    assert not tokens[0].startswith(" ")
    assert tokens[-1].endswith(".")
    assert simulated_text("hello", 10)[:6] == tokens[:6]
    assert simulated_text("hello", 0) == []


def test_input_text_of_flattens_instructions_strings_and_content_parts() -> None:
    body = {
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "first"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "second"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "third"}, {"type": "input_image"}]},
        ],
    }
    assert input_text_of(body) == "Be brief.\nfirst\nsecond\nthird"
    assert input_text_of({"input": "just this"}) == "just this"


async def test_models_lists_the_simulated_model(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [model.id for model in models.data] == ["sim-1"]


async def test_stream_events_validate_in_order_with_contiguous_sequence_numbers(http: ClientSession) -> None:
    events = await sse_events(http, {"model": "any-model", "input": "Hi there", "metadata": {"k": "v"}})
    for event in events:
        EVENT_ADAPTER.validate_python(event)
    assert [event["type"] for event in events] == HAPPY_PATH_TYPES
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    expected = simulated_text("Hi there", 20)
    assert [event["delta"] for event in events if event["type"] == "response.output_text.delta"] == expected
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress"
    assert completed["id"] == created["id"]
    assert completed["id"].startswith("resp_sim_")
    assert completed["model"] == "any-model"
    assert completed["metadata"] == {"k": "v"}
    assert completed["usage"]["output_tokens"] == 20
    assert completed["output"][0]["content"][0]["text"] == "".join(expected)
    assert completed["output"][0]["id"] == events[2]["item"]["id"]


async def test_sdk_stream_accumulates_the_simulated_text(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="sim-1", input="Tell me a story") as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "".join(simulated_text("Tell me a story", 20))


async def test_non_streaming_create_returns_a_valid_completed_response(
    client: openai.AsyncOpenAI, http: ClientSession
) -> None:
    response = await client.responses.create(model="sim-1", input="Hello", temperature=0.5)
    assert response.status == "completed"
    assert response.output_text == "".join(simulated_text("Hello", 20))
    assert response.temperature == 0.5
    async with http.post("/v1/responses", json={"model": "sim-1", "input": "Hello"}) as resp:
        Response.model_validate(await resp.json(), strict=False)


async def test_same_input_same_text_different_input_different_text(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model="sim-1", input="same")
    second = await client.responses.create(model="sim-1", input="same")
    other = await client.responses.create(model="sim-1", input="same", instructions="Be terse.")
    assert first.output_text == second.output_text
    assert first.id != second.id
    assert other.output_text != first.output_text


async def test_max_output_tokens_below_the_count_ends_incomplete(
    client: openai.AsyncOpenAI, http: ClientSession
) -> None:
    events = await sse_events(http, {"model": "sim-1", "input": "long", "max_output_tokens": 5})
    for event in events:
        EVENT_ADAPTER.validate_python(event)
    assert events[-1]["type"] == "response.incomplete"
    incomplete = events[-1]["response"]
    assert incomplete["status"] == "incomplete"
    assert incomplete["incomplete_details"] == {"reason": "max_output_tokens"}
    assert incomplete["output"][0]["content"][0]["text"] == "".join(simulated_text("long", 20)[:5])

    response = await client.responses.create(model="sim-1", input="long", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.usage is not None
    assert response.usage.output_tokens == 5
    roomy = await client.responses.create(model="sim-1", input="long", max_output_tokens=50)
    assert roomy.status == "completed"


async def test_token_count_and_pace_knobs(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    response = await client.responses.create(
        model="sim-1",
        input="pace",
        metadata={"sim_tokens": "5", "sim_token_delay_ms": "30"},
        extra_headers={"x-sim-ttft-ms": "100"},
    )
    assert time.monotonic() - started >= 0.1 + 4 * 0.03
    assert response.output_text == "".join(simulated_text("pace", 5))
    empty = await client.responses.create(model="sim-1", input="pace", metadata={"sim_tokens": "0"})
    assert empty.output_text == ""


async def test_frames_are_written_as_they_are_produced(http: ClientSession) -> None:
    started = time.monotonic()
    body = {"model": "sim-1", "input": "x", "stream": True}
    async with http.post("/v1/responses", json=body, headers={"x-sim-ttft-ms": "300"}) as resp:
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"event: response.created\n")
        assert time.monotonic() - started < 0.25
        await resp.read()
    assert time.monotonic() - started >= 0.3


async def test_header_knob_wins_over_metadata(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="sim-1", input="x", metadata={"sim_tokens": "9"}, extra_headers={"x-sim-tokens": "3"}
    )
    assert response.output_text == "".join(simulated_text("x", 3))


@pytest.mark.parametrize(
    ("fault", "error_class", "error_type"),
    [
        ("http_500", openai.InternalServerError, "server_error"),
        ("http_429", openai.RateLimitError, "invalid_request_error"),
        ("http_400", openai.BadRequestError, "invalid_request_error"),
    ],
)
async def test_http_fault_answers_an_error_envelope(
    client: openai.AsyncOpenAI, fault: str, error_class: type[openai.APIStatusError], error_type: str
) -> None:
    with pytest.raises(error_class) as caught:
        await client.responses.create(model="sim-1", input="x", stream=True, metadata={"sim_fault": fault})
    assert caught.value.status_code == int(fault.removeprefix("http_"))
    assert caught.value.type == error_type
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    if fault == "http_429":
        assert caught.value.response.headers["retry-after-ms"] == "10"


async def test_bad_knob_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="sim_tokens"):
        await client.responses.create(model="sim-1", input="x", metadata={"sim_tokens": "many"})
    with pytest.raises(openai.BadRequestError, match="sim_fault"):
        await client.responses.create(model="sim-1", input="x", extra_headers={"x-sim-fault": "explode"})


async def test_hang_holds_the_stream_until_the_client_leaves(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    stream = await client.responses.create(
        model="sim-1", input="x", stream=True, metadata={"sim_fault": "hang", "sim_tag": "hung"}
    )
    seen = [(await anext(aiter(stream))).type, (await anext(aiter(stream))).type]
    assert seen == ["response.created", "response.in_progress"]
    await asyncio.sleep(0.2)
    assert (await stats(http))["active"] == 1
    await stream.close()
    after = await wait_for_stats(http, disconnects=1, active=0)
    assert after["disconnects"] == 1, after
    assert after["disconnects_by_tag"] == {"hung": 1}
    assert after["active"] == 0
    assert after["completed"] == 0


async def test_fail_after_aborts_the_connection_mid_stream(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    stream = await client.responses.create(model="sim-1", input="x", stream=True, metadata={"sim_fail_after": "3"})
    seen: list[str] = []

    async def read_to_the_end() -> None:
        async for event in stream:
            seen.append(event.type)

    with pytest.raises(openai.APIConnectionError):
        await read_to_the_end()
    assert seen == ["response.created", "response.in_progress", "response.output_item.added"]
    with pytest.raises(openai.APIConnectionError):
        await client.responses.create(model="sim-1", input="x", extra_headers={"x-sim-fail-after": "3"})
    assert (await stats(http))["disconnects"] == 0


async def test_error_event_fails_the_response_after_the_first_delta(
    client: openai.AsyncOpenAI, http: ClientSession
) -> None:
    events = await sse_events(http, {"model": "sim-1", "input": "x", "metadata": {"sim_fault": "error_event"}})
    for event in events:
        EVENT_ADAPTER.validate_python(event)
    assert [event["type"] for event in events][-3:] == [
        "response.output_text.delta",
        "error",
        "response.failed",
    ]
    assert events[-2] == {
        "type": "error",
        "code": "server_error",
        "message": "simulated failure",
        "param": None,
        "sequence_number": len(events) - 2,
    }
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "simulated failure"}

    # The flat error event reaches SDK users as an event, not an exception.
    stream = await client.responses.create(model="sim-1", input="x", stream=True, metadata={"sim_fault": "error_event"})
    assert [event.type async for event in stream][-2:] == ["error", "response.failed"]


async def test_stats_tags_and_request_log(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    await client.responses.create(model="sim-1", input="warm-up")
    async with http.post("/sim/reset") as resp:
        assert (await resp.json())["requests"] == 0
    await client.responses.create(model="sim-1", input="one", metadata={"sim_tag": "a"})
    await client.responses.create(model="sim-1", input="two", extra_headers={"x-sim-tag": "b"})
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model="sim-1", input="three", metadata={"sim_tag": "a", "sim_fault": "http_500"})
    async with http.post("/v1/responses", data=b"not json") as resp:
        assert resp.status == 400

    assert await stats(http) == {
        "requests": 4,
        "active": 0,
        "completed": 2,
        "disconnects": 0,
        "requests_by_tag": {"a": 2, "b": 1},
        "disconnects_by_tag": {},
    }
    async with http.get("/sim/requests", params={"tag": "a"}) as resp:
        assert [body["input"] for body in await resp.json()] == ["one", "three"]
    async with http.get("/sim/requests") as resp:
        everything = await resp.json()
    assert [body and body["input"] for body in everything] == ["one", "two", "three", None]
    assert everything[0]["model"] == "sim-1"


async def test_run_simulator_serves_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(run_simulator("127.0.0.1", port, SimulatorSettings(tokens=2, ttft_ms=0)))
    try:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x") as client:
            for _ in range(100):
                try:
                    response = await client.responses.create(model="sim-1", input="cli")
                    break
                except openai.APIConnectionError:
                    await asyncio.sleep(0.02)
        assert response.output_text == "".join(simulated_text("cli", 2))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
