"""The simulated model server, driven by the official openai client as the gateway would drive it."""

from __future__ import annotations

import ast
import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)
from openai.types.responses import (
    CompactedResponse,
    Response,
    ResponseCompactionItem,
    ResponseInputItemParam,
    ResponseStreamEvent,
    ResponseUsage,
)
from pydantic import TypeAdapter

import simulator
from simulator import (
    SimulatorSettings,
    chat_input_text_of,
    create_simulator_app,
    input_text_of,
    run_simulator,
    simulated_text,
)
from simulator.chat import simulated_reasoning, simulated_tool_arguments
from simulator.compaction import SUMMARY_TOKENS
from simulator.text import compaction_summary, token_count

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


def test_simulator_imports_nothing_of_the_gateway() -> None:
    # It is a separate program reached over HTTP like any provider, so it must stand without the gateway's packages.
    imported: set[str] = set()
    for source in Path(simulator.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert "simulator" in imported
    assert imported.isdisjoint({"gateway", "runs", "storage"})


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
        "requests_by_path": {"/v1/responses": 4, "/v1/chat/completions": 0},
        "disconnects_by_tag": {},
        "peak_active_by_tag": {"a": 1, "b": 1},  # the malformed request never started a generation
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


# --- POST /v1/chat/completions ---

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi there"}]
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


def validate_chunk(raw: dict[str, Any]) -> ChatCompletionChunk:
    """Validate against the SDK model and refuse fields it does not know (bar the de-facto reasoning_content)."""
    chunk = ChatCompletionChunk.model_validate(raw)
    assert not chunk.model_extra
    for choice in chunk.choices:
        assert not choice.model_extra
        assert set(choice.delta.model_extra or {}) <= {"reasoning_content"}
    return chunk


async def chat_frames(
    http: ClientSession, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """POST a streaming chat request; return its JSON frames (chunks validated) and whether [DONE] ended it."""
    async with http.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    # OpenAI's chat stream is bare data lines: no event names, no ids.
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames)
    done = frames[-1] == "data: [DONE]"
    chunks = [orjson.loads(frame.removeprefix("data: ")) for frame in frames[: -1 if done else None]]
    for chunk in chunks:
        if "error" not in chunk:
            validate_chunk(chunk)
    return chunks, done


def deltas(chunks: list[dict[str, Any]], key: str) -> list[Any]:
    return [c["choices"][0]["delta"][key] for c in chunks if c["choices"] and key in c["choices"][0]["delta"]]


@pytest.mark.parametrize(
    ("responses_body", "chat_body"),
    [
        pytest.param({"input": "just this"}, {"messages": [{"role": "user", "content": "just this"}]}, id="string"),
        pytest.param(
            {"instructions": "Be brief.", "input": "hello"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]},
            id="instructions",
        ),
        pytest.param(
            {
                "input": [
                    {"role": "user", "content": "plain"},
                    {"role": "user", "content": ""},
                    {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "part one"},
                            {"type": "input_image", "image_url": "data:,"},
                            {"type": "input_text", "text": "part two"},
                        ],
                    },
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "plain"},
                    {"role": "user", "content": ""},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "part one"},
                            {"type": "image_url", "image_url": {"url": "data:,"}},
                            {"type": "text", "text": "part two"},
                        ],
                    },
                ]
            },
            id="items-and-parts",
        ),
        pytest.param(
            {
                "instructions": "Sys.",
                "input": [
                    {"role": "user", "content": "q1"},
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a1"}]},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                    {"role": "user", "content": [{"type": "input_text", "text": "q2"}]},
                ],
            },
            {
                "messages": [
                    {"role": "system", "content": "Sys."},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                    {"role": "user", "content": "q2"},
                ]
            },
            id="assistant-history",
        ),
    ],
)
def test_chat_input_text_of_equals_input_text_of_for_the_same_conversation(
    responses_body: dict[str, Any], chat_body: dict[str, Any]
) -> None:
    assert chat_input_text_of(chat_body) == input_text_of(responses_body)


def test_chat_input_text_of_takes_tool_turns_content_only_when_there_is_some() -> None:
    calling = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}
    messages = [
        {"role": "user", "content": "q"},
        {**calling, "content": ""},
        {**calling, "content": "let me look"},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": ""},
        {"role": "tool", "tool_call_id": "c3", "content": [{"type": "text", "text": "windy"}]},
    ]
    assert chat_input_text_of({"messages": messages}) == "q\nlet me look\nsunny\nwindy"
    assert chat_input_text_of({}) == chat_input_text_of({"messages": "nope"}) == ""


async def test_chat_stream_chunks_validate_in_order(http: ClientSession) -> None:
    body = {"model": "any-model", "messages": HI, "stream_options": {"include_usage": True}}
    chunks, done = await chat_frames(http, body)
    assert done
    expected = simulated_text(chat_input_text_of(body), 20)
    assert len(chunks) == 1 + 20 + 2
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(chunks, "content") == ["", *expected]
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 20,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-2])
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert {(chunk["object"], chunk["model"], chunk["created"]) for chunk in chunks} == {
        ("chat.completion.chunk", "any-model", chunks[0]["created"])
    }

    plain, done = await chat_frames(http, {"model": "sim-1", "messages": HI})
    assert done
    assert len(plain) == 1 + 20 + 1
    assert all("usage" not in chunk for chunk in plain)


async def test_chat_sdk_stream_joins_to_the_simulated_text(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": "Be brief."}, *HI]
    stream = await client.chat.completions.create(
        model="sim-1", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "".join(simulated_text(chat_input_text_of({"messages": messages}), 20))
    assert text == "".join(simulated_text(input_text_of({"instructions": "Be brief.", "input": "Hi there"}), 20))
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert [chunk.usage is not None for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20

    unasked = await client.chat.completions.create(model="sim-1", messages=messages, stream=True)
    assert [chunk.usage async for chunk in unasked] == [None] * 22


async def test_chat_non_streaming_returns_a_valid_completion(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    completion = await client.chat.completions.create(model="any-model", messages=HI)
    choice = completion.choices[0]
    assert choice.message.content == "".join(simulated_text("Hi there", 20))
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert completion.model == "any-model"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 20)
    async with http.post("/v1/chat/completions", json={"model": "sim-1", "messages": HI}) as resp:
        raw = await resp.json()
    parsed = ChatCompletion.model_validate(raw)
    assert not parsed.model_extra
    assert parsed.object == "chat.completion"
    assert parsed.id.startswith("chatcmpl-")


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
async def test_chat_token_cap_finishes_with_length(
    client: openai.AsyncOpenAI, http: ClientSession, cap_field: str
) -> None:
    chunks, done = await chat_frames(http, {"model": "sim-1", "messages": HI, cap_field: 5})
    assert done
    assert deltas(chunks, "content")[1:] == simulated_text("Hi there", 20)[:5]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    capped = await client.chat.completions.create(model="sim-1", messages=HI, extra_body={cap_field: 5})
    assert capped.choices[0].message.content == "".join(simulated_text("Hi there", 20)[:5])
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 5
    roomy = await client.chat.completions.create(model="sim-1", messages=HI, extra_body={cap_field: 20})
    assert roomy.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match=cap_field):
        await client.chat.completions.create(model="sim-1", messages=HI, extra_body={cap_field: 0})


async def test_chat_max_completion_tokens_wins_over_max_tokens(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="sim-1", messages=HI, max_completion_tokens=3, max_tokens=7)
    assert completion.choices[0].message.content == "".join(simulated_text("Hi there", 20)[:3])


async def test_chat_tool_calls_stream_in_pieces_that_assemble_to_json(
    client: openai.AsyncOpenAI, http: ClientSession
) -> None:
    body: dict[str, Any] = {"model": "sim-1", "messages": HI, "tools": TOOLS, "metadata": {"sim_tool_calls": "3"}}
    chunks, done = await chat_frames(http, body)
    assert done
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert first["content"] is None
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert deltas(chunks, "content") == [None]
    pieces_per_call = [0, 0, 0]
    for call_delta in (call for calls in deltas(chunks, "tool_calls") for call in calls):
        if "id" not in call_delta:
            assert set(call_delta) == {"index", "function"}
            pieces_per_call[call_delta["index"]] += 1
    assert min(pieces_per_call) >= 3

    stream = await client.chat.completions.create(
        model="sim-1", messages=HI, tools=TOOLS, stream=True, extra_body={"metadata": {"sim_tool_calls": "3"}}
    )
    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    async for chunk in stream:
        finish_reasons.append(chunk.choices[0].finish_reason)
        for tool_call in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(tool_call.index, {"id": "", "name": "", "arguments": ""})
            assert tool_call.function is not None
            call["id"] += tool_call.id or ""
            call["name"] += tool_call.function.name or ""
            call["arguments"] += tool_call.function.arguments or ""
    assert finish_reasons[-1] == "tool_calls"
    assert [call["name"] for call in calls.values()] == ["get_weather", "get_time", "get_weather"]
    assert all(call["id"].startswith("call_") for call in calls.values())
    assert len({call["id"] for call in calls.values()}) == 3
    for index, call in calls.items():
        arguments = json.loads(call["arguments"])
        assert arguments["n"] == index
        assert isinstance(arguments["city"], str)
        assert call["arguments"] == simulated_tool_arguments("Hi there", index)


async def test_chat_non_streaming_tool_calls(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="sim-1", messages=HI, tools=TOOLS[1:], extra_headers={"x-sim-tool-calls": "2"}
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    calls = [call for call in choice.message.tool_calls if isinstance(call, ChatCompletionMessageFunctionToolCall)]
    assert len(calls) == 2
    assert [call.function.name for call in calls] == ["get_time", "get_time"]
    assert [json.loads(call.function.arguments)["n"] for call in calls] == [0, 1]


async def test_chat_tool_calls_need_function_tools(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tools"):
        await client.chat.completions.create(
            model="sim-1", messages=HI, extra_body={"metadata": {"sim_tool_calls": "1"}}
        )
    with pytest.raises(openai.BadRequestError, match="sim_tool_calls"):
        await client.chat.completions.create(
            model="sim-1", messages=HI, tools=TOOLS, extra_body={"metadata": {"sim_tool_calls": "1.5"}}
        )


async def test_chat_reasoning_streams_before_the_content(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    body = {"model": "sim-1", "messages": HI, "metadata": {"sim_reasoning": "4", "sim_tokens": "3"}}
    chunks, _ = await chat_frames(http, {**body, "stream_options": {"include_usage": True}})
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in chunks if c["choices"]]
    assert kinds == ["role", *["reasoning_content"] * 4, *["content"] * 3, None]
    assert deltas(chunks, "reasoning_content") == simulated_reasoning("Hi there", 4)
    assert deltas(chunks, "content")[1:] == simulated_text("Hi there", 3)
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}

    completion = await client.chat.completions.create(
        model="sim-1", messages=HI, extra_body={"metadata": body["metadata"]}
    )
    message = completion.choices[0].message
    assert message.content == "".join(simulated_text("Hi there", 3))
    assert message.model_extra == {"reasoning_content": "".join(simulated_reasoning("Hi there", 4))}

    # Reasoning then calls: the opening chunk keeps the role, so the first call does not repeat it.
    calling = {**body, "tools": TOOLS, "metadata": {"sim_reasoning": "2", "sim_tool_calls": "1"}}
    chunks, _ = await chat_frames(http, calling)
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in chunks]
    assert kinds[:4] == ["role", "reasoning_content", "reasoning_content", "tool_calls"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_chat_count_and_pace_knobs(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    started = time.monotonic()
    completion = await client.chat.completions.create(
        model="sim-1",
        messages=HI,
        extra_body={"metadata": {"sim_tokens": "5", "sim_token_delay_ms": "30"}},
        extra_headers={"x-sim-ttft-ms": "100", "x-sim-tokens": "4"},
    )
    assert time.monotonic() - started >= 0.1 + 3 * 0.03
    assert completion.choices[0].message.content == "".join(simulated_text("Hi there", 4))

    started = time.monotonic()
    body = {"model": "sim-1", "messages": HI, "stream": True}
    async with http.post("/v1/chat/completions", json=body, headers={"x-sim-ttft-ms": "300"}) as resp:
        opening = await resp.content.readuntil(b"\n\n")
        assert b'"role":"assistant"' in opening
        assert time.monotonic() - started < 0.25
        await resp.read()
    assert time.monotonic() - started >= 0.3

    empty, done = await chat_frames(http, {"model": "sim-1", "messages": HI, "metadata": {"sim_tokens": "0"}})
    assert done
    assert deltas(empty, "content") == [""]


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        ("http_500", openai.InternalServerError),
        ("http_429", openai.RateLimitError),
        ("http_400", openai.BadRequestError),
    ],
)
async def test_chat_http_fault_answers_an_error_envelope(
    client: openai.AsyncOpenAI, fault: str, error_class: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error_class) as caught:
        await client.chat.completions.create(
            model="sim-1", messages=HI, stream=True, extra_body={"metadata": {"sim_fault": fault}}
        )
    assert caught.value.status_code == int(fault.removeprefix("http_"))
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}


async def test_chat_malformed_requests_are_400s(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    async with http.post("/v1/chat/completions", json={"model": "sim-1"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="sim_fault"):
        await client.chat.completions.create(model="sim-1", messages=HI, extra_headers={"x-sim-fault": "explode"})


async def test_chat_hang_holds_the_stream_until_the_client_leaves(
    client: openai.AsyncOpenAI, http: ClientSession
) -> None:
    stream = await client.chat.completions.create(
        model="sim-1", messages=HI, stream=True, extra_body={"metadata": {"sim_fault": "hang", "sim_tag": "hung"}}
    )
    opening = await anext(aiter(stream))
    assert opening.choices[0].delta.role == "assistant"
    await asyncio.sleep(0.2)
    assert (await stats(http))["active"] == 1
    await stream.close()
    after = await wait_for_stats(http, disconnects=1, active=0)
    assert after["disconnects_by_tag"] == {"hung": 1}, after
    assert after["active"] == 0
    assert after["completed"] == 0


async def test_chat_fail_after_aborts_the_connection(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    stream = await client.chat.completions.create(
        model="sim-1", messages=HI, stream=True, extra_body={"metadata": {"sim_fail_after": "3"}}
    )
    seen: list[str | None] = []

    async def read_to_the_end() -> None:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIConnectionError):
        await read_to_the_end()
    assert seen == ["", *simulated_text("Hi there", 20)[:2]]
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="sim-1", messages=HI, extra_headers={"x-sim-fail-after": "3"})
    assert (await stats(http))["disconnects"] == 0


async def test_chat_error_event_ends_the_stream_without_done(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    body: dict[str, Any] = {"model": "sim-1", "messages": HI, "metadata": {"sim_fault": "error_event"}}
    chunks, done = await chat_frames(http, body)
    assert not done
    assert deltas(chunks[:-1], "content") == ["", simulated_text("Hi there", 20)[0]]
    assert chunks[-1] == {"error": {"message": "simulated failure", "type": "server_error", "code": "server_error"}}

    calling, done = await chat_frames(
        http, {**body, "tools": TOOLS, "metadata": {**body["metadata"], "sim_tool_calls": "2"}}
    )
    assert not done
    assert [list(chunk) for chunk in calling[1:]] == [["error"]]
    assert calling[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0

    # The SDK turns the error frame into an exception; a non-streaming request gets a 500.
    stream = await client.chat.completions.create(model="sim-1", messages=HI, stream=True, extra_body=body)
    with pytest.raises(openai.APIError, match="simulated failure"):
        async for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError, match="simulated failure"):
        await client.chat.completions.create(model="sim-1", messages=HI, extra_body=body)


async def test_chat_requests_share_the_stats_and_request_log(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    await client.responses.create(model="sim-1", input="one", metadata={"sim_tag": "a"})
    await client.chat.completions.create(model="sim-1", messages=HI, extra_body={"metadata": {"sim_tag": "a"}})
    stream = await client.chat.completions.create(
        model="sim-1", messages=HI, stream=True, extra_headers={"x-sim-tag": "b"}
    )
    async for _ in stream:
        pass
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="sim-1", messages=HI, extra_body={"metadata": {"sim_tag": "b", "sim_fault": "http_429"}}
        )
    async with http.post("/v1/chat/completions", data=b"not json") as resp:
        assert resp.status == 400

    assert await stats(http) == {
        "requests": 5,
        "active": 0,
        "completed": 3,
        "disconnects": 0,
        "requests_by_tag": {"a": 2, "b": 2},
        "requests_by_path": {"/v1/responses": 1, "/v1/chat/completions": 4},
        "disconnects_by_tag": {},
        "peak_active_by_tag": {"a": 1, "b": 1},
    }
    async with http.get("/sim/requests", params={"tag": "a"}) as resp:
        logged = await resp.json()
    assert [("input" in body, "messages" in body) for body in logged] == [(True, False), (False, True)]
    async with http.post("/sim/reset") as resp:
        assert (await resp.json())["requests_by_path"] == {"/v1/responses": 0, "/v1/chat/completions": 0}


async def test_responses_endpoint_ignores_the_chat_only_knobs(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="sim-1", input="x", metadata={"sim_tool_calls": "2", "sim_reasoning": "3"}
    )
    assert response.status == "completed"
    assert response.output_text == "".join(simulated_text("x", 20))


# --- side routes: /v1/responses/input_tokens, /tokenize, /v1/responses/compact ---

CONVERSATION: list[ResponseInputItemParam] = [
    {"role": "user", "content": "Plan a trip to Rome"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure, when do you go?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
    {"role": "user", "content": [{"type": "input_text", "text": "In May, for a week"}]},
]
# "Be brief." + the three texts above, in words.
CONVERSATION_TOKENS = 2 + 5 + 5 + 5


@pytest.mark.parametrize(
    ("request_fields", "tokens"),
    [
        pytest.param({"input": "Hello there, how are you"}, 5, id="string"),
        pytest.param({"input": CONVERSATION, "instructions": "Be brief."}, CONVERSATION_TOKENS, id="items"),
    ],
)
async def test_input_tokens_count_equals_the_usage_of_a_create(
    client: openai.AsyncOpenAI, request_fields: dict[str, Any], tokens: int
) -> None:
    counted = await client.responses.input_tokens.count(model="sim-1", **request_fields)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == tokens
    created = await client.responses.create(model="sim-1", **request_fields)
    assert created.usage is not None
    assert created.usage.input_tokens == counted.input_tokens


async def test_input_tokens_refuses_bad_and_stateful_bodies(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    async with http.post("/v1/responses/input_tokens", data=b"not json") as resp:
        assert resp.status == 400
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    for body, param in (
        ({"input": 5}, "input"),
        ({"input": ["not an item"]}, "input[0]"),
        ({"input": "x", "instructions": ["no"]}, "instructions"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ):
        async with http.post("/v1/responses/input_tokens", json=body) as resp:
            assert resp.status == 400, body
            error = (await resp.json())["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_tokenize_counts_as_the_chat_usage_counts(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there friend"},
    ]
    completion = await client.chat.completions.create(model="sim-1", messages=messages)
    assert completion.usage is not None
    async with http.post("/tokenize", json={"model": "sim-1", "messages": messages}) as resp:
        assert resp.status == 200
        chat = await resp.json()
    assert set(chat) == {"count", "max_model_len", "tokens"}  # vLLM's shape
    assert chat["count"] == completion.usage.prompt_tokens == 5
    assert chat["max_model_len"] == 32768
    assert len(chat["tokens"]) == 5
    assert all(isinstance(token, int) and token >= 0 for token in chat["tokens"])

    async with http.post("/tokenize", json={"model": "sim-1", "prompt": "Hi there friend"}) as resp:
        prompt = await resp.json()
    assert prompt["count"] == 3
    assert prompt["tokens"] == chat["tokens"][2:]  # the same words, the same ids
    async with http.post("/tokenize", json={"content": "Hi there friend"}) as resp:
        assert await resp.json() == {"tokens": prompt["tokens"]}  # llama.cpp's shape: tokens only

    for body, param in (({"model": "sim-1"}, "prompt"), ({"prompt": 5}, "prompt"), ({"messages": []}, "messages")):
        async with http.post("/tokenize", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == param


async def test_compact_keeps_the_user_messages_and_folds_the_rest(
    client: openai.AsyncOpenAI, http: ClientSession
) -> None:
    compacted = await client.responses.compact(model="sim-1", input=CONVERSATION, instructions="Be brief.")
    assert isinstance(compacted, CompactedResponse)
    assert compacted.object == "response.compaction"
    assert compacted.id.startswith("cmp_")
    assert abs(compacted.created_at - time.time()) < 60
    assert [item.type for item in compacted.output] == ["message", "message", "compaction"]
    compaction = compacted.output[-1]
    assert isinstance(compaction, ResponseCompactionItem)
    assert compaction.id.startswith("cmpitem_")
    assert compaction.encrypted_content
    assert compacted.usage.input_tokens == CONVERSATION_TOKENS
    assert compacted.usage.output_tokens == SUMMARY_TOKENS
    assert compacted.usage.total_tokens == CONVERSATION_TOKENS + SUMMARY_TOKENS

    # The raw body: user messages verbatim, as OpenAI lists them; the rest validates against the SDK's models.
    async with http.post("/v1/responses/compact", json={"model": "sim-1", "input": CONVERSATION}) as resp:
        raw = await resp.json()
    assert set(raw) == {"id", "object", "created_at", "output", "usage"}
    assert [(item["type"], item["role"], item["status"], item["content"]) for item in raw["output"][:-1]] == [
        ("message", "user", "completed", [{"type": "input_text", "text": "Plan a trip to Rome"}]),
        ("message", "user", "completed", [{"type": "input_text", "text": "In May, for a week"}]),
    ]
    assert all(item["id"].startswith("msg_") for item in raw["output"][:-1])
    assert not ResponseCompactionItem.model_validate(raw["output"][-1]).model_extra
    usage = ResponseUsage.model_validate(raw["usage"])
    assert not usage.model_extra
    assert usage.input_tokens == CONVERSATION_TOKENS - 2  # no instructions this time


async def test_a_compaction_item_round_trips_as_input(client: openai.AsyncOpenAI) -> None:
    # As JSON: the SDK's output model has no user message, so dumping the parsed items warns.
    raw = await client.responses.with_raw_response.compact(model="sim-1", input=CONVERSATION)
    output = raw.http_response.json()["output"]
    compaction = ResponseCompactionItem.model_validate(output[-1])
    summary = compaction_summary(compaction.encrypted_content)
    assert summary is not None
    assert token_count(summary) == SUMMARY_TOKENS
    assert compaction_summary("Zm9yZWlnbg==") is None  # content the simulator did not make counts for nothing

    next_input: list[Any] = [*output, {"role": "user", "content": "And June?"}]
    response = await client.responses.create(model="sim-1", input=next_input)
    # The summary stands in for what was compacted: it is counted, and it seeds the answer.
    expected_input = "\n".join(["Plan a trip to Rome", "In May, for a week", summary, "And June?"])
    assert input_text_of({"input": next_input}) == expected_input
    assert response.usage is not None
    assert response.usage.input_tokens == 5 + 5 + SUMMARY_TOKENS + 2
    assert response.output_text == "".join(simulated_text(expected_input, 20))
    counted = await client.responses.input_tokens.count(model="sim-1", input=next_input)
    assert counted.input_tokens == response.usage.input_tokens

    # Compacting again folds the earlier compaction into the new one.
    again = await client.responses.compact(model="sim-1", input=next_input)
    assert [item.type for item in again.output] == ["message", "message", "message", "compaction"]
    assert again.output[-1].id != compaction.id


async def test_compact_refuses_previous_response_id(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.compact(model="sim-1", previous_response_id="resp_1")
    assert caught.value.param == "previous_response_id"
    for body, param in (({"model": "sim-1"}, "input"), ({"input": {"role": "user"}}, "input")):
        async with http.post("/v1/responses/compact", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == param


async def test_side_routes_share_the_stats_and_the_http_faults(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    tagged = {"x-sim-tag": "side"}
    await client.responses.compact(model="sim-1", input="x", extra_headers=tagged)
    await client.responses.input_tokens.count(model="sim-1", input="x", extra_headers=tagged)
    async with http.post("/tokenize", json={"prompt": "x"}, headers=tagged) as resp:
        assert resp.status == 200
    with pytest.raises(openai.InternalServerError):
        await client.responses.compact(model="sim-1", input="x", extra_headers={**tagged, "x-sim-fault": "http_500"})
    current = await stats(http)
    assert current["requests_by_tag"] == {"side": 4}
    assert current["requests_by_path"] == {
        "/v1/responses": 0,
        "/v1/chat/completions": 0,
        "/v1/responses/compact": 2,
        "/v1/responses/input_tokens": 1,
        "/tokenize": 1,
    }
    async with http.get("/sim/requests", params={"tag": "side"}) as resp:
        assert [body["input"] for body in await resp.json() if "input" in body] == ["x", "x", "x"]


async def test_no_compact_answers_404_where_a_provider_lacks_the_routes(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(create_simulator_app(SimulatorSettings(ttft_ms=0, token_delay_ms=0, compact=False)))
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as compact_refused:
            await client.responses.compact(model="sim-1", input="x")
        with pytest.raises(openai.NotFoundError) as count_refused:
            await client.responses.input_tokens.count(model="sim-1", input="x")
        assert (await client.responses.create(model="sim-1", input="x")).status == "completed"
    assert compact_refused.value.body == {
        "message": "Invalid URL (POST /v1/responses/compact)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert "Invalid URL (POST /v1/responses/input_tokens)" in count_refused.value.message


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/resp_123"),
        ("DELETE", "/v1/responses/resp_123"),
        ("POST", "/v1/responses/resp_123/cancel"),
        ("GET", "/v1/responses/resp_123/input_items"),
        ("GET", "/v1/responses/compact"),
        ("POST", "/v1/responses/nonsense"),
    ],
)
async def test_other_responses_routes_are_404_envelopes(http: ClientSession, method: str, path: str) -> None:
    # The simulator stores nothing, so there is never a response to retrieve, cancel or list.
    async with http.request(method, path) as resp:
        assert resp.status == 404
        assert await resp.json() == {
            "error": {
                "message": f"Invalid URL ({method} {path})",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
