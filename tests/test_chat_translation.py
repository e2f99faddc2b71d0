"""Chat Completions ⇄ Responses: golden streams, request translation, and recorded streams through the gateway.

Golden files: `tests/golden/chat/NAME.jsonl` holds a recorded chunk stream, `NAME.expected.json` the Responses
events it must become (ids normalised). `REGENERATE_GOLDEN=1 pytest tests/test_chat_translation.py` rewrites the
expected files; review the diff before committing it.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai.types.responses import Response

from gateway.config import load_settings
from runs.errors import InvalidRequest
from runs.upstream.chat_request import GATEWAY_NOTES, ChatDialect, chat_request
from runs.upstream.chat_stream import ChatStreamTranslator
from tests.conftest import serve_gateway
from tests.strict_models import check_event

GOLDEN = Path(__file__).parent / "golden" / "chat"
NAMES = sorted(path.stem for path in GOLDEN.glob("*.jsonl"))
ID_PATTERN = re.compile(r"\b(msg|rs|fc|call)_[0-9a-f]{32}\b")


def recorded(name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (GOLDEN / f"{name}.jsonl").read_bytes().splitlines() if line.strip()]


def normalise_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generated ids become `msg_1`, `fc_2`, … in order of first appearance, so goldens are stable."""
    seen: dict[str, str] = {}

    def rename(match: re.Match[str]) -> str:
        return seen.setdefault(match.group(0), f"{match.group(1)}_{len(seen) + 1}")

    return list(orjson.loads(ID_PATTERN.sub(rename, orjson.dumps(events).decode())))


def translate(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    translator = ChatStreamTranslator()
    events = [event for chunk in chunks for event in translator.feed(chunk)]
    return events + translator.finish()


@pytest.mark.parametrize("name", NAMES)
def test_golden_stream(name: str) -> None:
    events = normalise_ids(translate(recorded(name)))
    expected_path = GOLDEN / f"{name}.expected.json"
    if os.environ.get("REGENERATE_GOLDEN"):
        expected_path.write_bytes(orjson.dumps(events, option=orjson.OPT_INDENT_2) + b"\n")
    assert events == orjson.loads(expected_path.read_bytes())


@pytest.mark.parametrize("name", NAMES)
def test_golden_events_validate_against_the_strict_sdk_models(name: str) -> None:
    events = translate(recorded(name))
    for number, event in enumerate(events[:-1]):  # the last one's response is completed by the run
        check_event({**event, "sequence_number": number})
    kinds = [event["type"] for event in events]
    # Every item opened is closed, in order, and the text/arguments deltas sit between.
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done")
    assert kinds[-1] in ("response.completed", "response.incomplete")


def test_golden_expectations_in_words() -> None:
    """The goldens, spelled out for the cases the issue names."""
    text = translate(recorded("text"))
    assert [e["type"] for e in text] == [
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert text[-1]["response"]["output"][0]["content"][0]["text"] == "Hello, world!"
    assert text[-1]["response"]["usage"]["total_tokens"] == 17

    split = translate(recorded("tool_call_split"))
    arguments = "".join(e["delta"] for e in split if e["type"] == "response.function_call_arguments.delta")
    assert orjson.loads(arguments) == {"city": "Paris", "unit": "c"}
    call = split[-1]["response"]["output"][0]
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == (
        "function_call",
        "call_weather1",
        "get_weather",
        arguments,
    )

    parallel = translate(recorded("parallel_calls"))[-1]["response"]["output"]
    assert [(c["call_id"], c["name"], orjson.loads(c["arguments"])) for c in parallel] == [
        ("call_a", "get_weather", {"city": "Oslo"}),
        ("call_b", "get_time", {"tz": "Europe/Oslo"}),
    ]

    length = translate(recorded("length"))[-1]
    assert length["type"] == "response.incomplete"
    assert length["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert length["response"]["output"][0]["status"] == "incomplete"

    reasoning = translate(recorded("reasoning"))[-1]["response"]
    assert [item["type"] for item in reasoning["output"]] == ["reasoning", "message"]
    assert reasoning["output"][0]["content"][0]["text"] == "The user greets me."
    assert reasoning["usage"]["output_tokens_details"]["reasoning_tokens"] == 5


# Request translation.

DIALECT = ChatDialect()


def test_request_translation_of_a_conversation_with_tools() -> None:
    body: dict[str, Any] = {
        "model": "local",
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Oslo?"}],
            },
            {"role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "3 C"},
            {"type": "function_call_output", "call_id": "c2", "output": "12:00"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "3 C at noon."}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAA"}]},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        "max_output_tokens": 100,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
    }
    chat = chat_request(body, model="upstream-name", dialect=DIALECT)
    assert chat["model"] == "upstream-name"
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
        {"role": "assistant", "content": "3 C at noon."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]},
    ]
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    assert (chat["max_tokens"], chat["temperature"], chat["top_p"], chat["top_k"]) == (100, 0.2, 0.9, 40)
    assert "metadata" not in chat_request({**body, "metadata": {"a": "1"}}, model="m", dialect=DIALECT)
    with_metadata = chat_request({**body, "metadata": {"a": "1"}}, model="m", dialect=ChatDialect(send_metadata=True))
    assert with_metadata["metadata"] == {"a": "1"}


def test_request_translation_options() -> None:
    body = {"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}, "max_output_tokens": 5}
    chat = chat_request(body, model="m", dialect=ChatDialect(max_tokens_field="max_completion_tokens"))
    assert chat["response_format"] == {"type": "json_object"}
    assert chat["max_completion_tokens"] == 5
    assert "max_tokens" not in chat
    effort = chat_request(
        {"model": "m", "input": "hi", "reasoning": {"effort": "low"}},
        model="m",
        dialect=ChatDialect(reasoning_effort=True),
    )
    assert effort["reasoning_effort"] == "low"
    logprobs = chat_request(
        {"model": "m", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 3},
        model="m",
        dialect=DIALECT,
    )
    assert (logprobs["logprobs"], logprobs["top_logprobs"]) == (True, 3)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"reasoning": {"generate_summary": "auto"}}, "reasoning.summary"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"include": ["web_search_call.action.sources"]}, "include[0]"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
    ],
)
def test_what_chat_cannot_honour_is_a_400_naming_it(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_request({"model": "m", "input": "hi", **extra}, model="m", dialect=DIALECT)
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("extra", "dropped"),
    [
        ({"tools": [{"type": "web_search"}]}, ["tools[0]"]),
        ({"reasoning": {"effort": "high", "summary": "auto"}}, ["reasoning.effort", "reasoning.summary"]),
        ({"truncation": "auto", "max_tool_calls": 2}, ["truncation", "max_tool_calls"]),
        ({"include": ["web_search_call.action.sources", "reasoning.encrypted_content"]}, ["include[0]"]),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}, {"role": "user", "content": "hi"}]}, ["input[0]"]),
    ],
)
def test_under_the_drop_policy_what_chat_cannot_do_is_left_out_and_noted(
    extra: dict[str, Any], dropped: list[str]
) -> None:
    chat = chat_request({"model": "m", "input": "hi", **extra}, model="m", dialect=ChatDialect(drop_unsupported=True))
    assert chat[GATEWAY_NOTES]["dropped"] == dropped
    assert "tools" not in chat
    assert "reasoning_effort" not in chat


# Recorded streams through a real gateway.


async def recorded_provider(request: web.Request) -> web.StreamResponse:
    """A provider that answers with the recorded stream named by the request's model. `cut:NAME` stops the
    stream before its finish reason (no `[DONE]`), as a proxy timing out would."""
    model = (await request.json())["model"]
    chunks = recorded(model.removeprefix("cut:"))
    if model.startswith("cut:"):
        chunks = [chunk for chunk in chunks if not any(c.get("finish_reason") for c in chunk.get("choices", []))][:-1]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if not model.startswith("cut:"):
        await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture
async def provider_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", recorded_provider)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


@pytest.mark.parametrize("name", NAMES)
async def test_recorded_streams_accumulate_in_the_sdk(provider_url: str, name: str) -> None:
    settings = load_settings(
        upstreams=[{"name": "recorded", "kind": "chat", "base_url": provider_url, "max_retries": 0}]
    )
    expected = translate(recorded(name))[-1]["response"]
    async with serve_gateway(settings) as gateway:
        async with gateway.client.responses.stream(model=name, input="replay") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response() if expected["status"] == "completed" else None
        stored = await gateway.client.responses.retrieve(events[0].response.id)  # type: ignore[union-attr]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert stored.status == expected["status"]
    assert normalise_ids([item.model_dump(exclude_none=True) for item in stored.output]) == normalise_ids(
        [{key: value for key, value in item.items() if value is not None} for item in expected["output"]]
    )
    if final is not None:
        assert isinstance(final, Response)
        assert final.output_text == stored.output_text
        assert [item.model_dump(exclude={"parsed_arguments"}) for item in final.output if item.type != "message"] == [
            item.model_dump() for item in stored.output if item.type != "message"
        ]


async def test_a_stream_that_stops_without_a_finish_reason_is_a_failure(provider_url: str) -> None:
    settings = load_settings(
        upstreams=[{"name": "recorded", "kind": "chat", "base_url": provider_url, "max_retries": 0}]
    )
    async with serve_gateway(settings) as gateway:
        stream = await gateway.client.responses.create(model="cut:text", input="replay", stream=True)
        events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"  # type: ignore[union-attr]


_NAMESPACED: Any = {
    "type": "namespace",
    "name": "repo",
    "description": "Repository tools",
    "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}],
}


def test_namespaced_functions_are_flattened_without_collisions_and_chosen_by_name() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "input": "hi",
        "tools": [_NAMESPACED],
        "tool_choice": {"type": "function", "name": "read_file"},
    }
    chat = chat_request(body, model="m", dialect=DIALECT)
    assert chat["tools"][0]["function"]["name"] == "repo__read_file"
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "repo__read_file"}}
    assert chat[GATEWAY_NOTES]["namespaces"] == {"repo__read_file": ["repo", "read_file"]}
    clash: Any = [{"type": "function", "name": "repo__read_file"}, _NAMESPACED]
    with pytest.raises(InvalidRequest) as caught:
        chat_request({"model": "m", "input": "hi", "tools": clash}, model="m", dialect=DIALECT)
    assert caught.value.param == "tools[1].tools[0]"


def test_a_tool_choice_without_tools_left_is_not_sent_and_a_clients_notes_are_not_ours() -> None:
    body: dict[str, Any] = {"model": "m", "input": "hi", "tools": [{"type": "web_search"}], "tool_choice": "required"}
    chat = chat_request(body, model="m", dialect=ChatDialect(drop_unsupported=True))
    assert "tool_choice" not in chat
    assert chat[GATEWAY_NOTES] == {"dropped": ["tools[0]"], "namespaces": {}}
    smuggled = chat_request({"model": "m", "input": "hi", GATEWAY_NOTES: "abc"}, model="m", dialect=DIALECT)
    assert GATEWAY_NOTES not in smuggled  # neither sent on nor taken for the gateway's own


def test_client_only_fields_never_reach_a_chat_server() -> None:
    chat = chat_request(
        {"model": "m", "input": "hi", "client_metadata": {"session_id": "s"}}, model="m", dialect=DIALECT
    )
    assert "client_metadata" not in chat


def test_a_message_between_tool_calls_and_their_outputs_goes_after_the_outputs() -> None:
    """Steering input joins a continuation before its tool outputs (as the Responses API orders it); Chat wants
    an assistant's tool calls answered at once, so the message moves to just after the answers."""
    body = {
        "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
            {"role": "user", "content": "and tomorrow too"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rainy"},
            {"role": "user", "content": "thanks"},
        ]
    }
    chat = chat_request(body, model="m", dialect=DIALECT)
    roles = [(message["role"], message.get("content")) for message in chat["messages"]]
    assert roles == [
        ("user", "weather?"),
        ("assistant", None),
        ("tool", "sunny"),
        ("tool", "rainy"),
        ("user", "and tomorrow too"),
        ("user", "thanks"),
    ]
