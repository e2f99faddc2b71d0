"""Chat servers' dialects (issue 16): the simulator imitates llama-cpp-python and vLLM; the gateway's presets make
structured output work on each, count usage where the stream has none, and list models whatever a provider lists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import BaseModel

import runs.upstream.chat
from gateway.config import load_settings
from tests.conftest import Gateway, serve_gateway, simulator_process
from tests.helpers import sim_requests


class Forecast(BaseModel):
    city: str
    degrees: int


def _simulator(*flags: str) -> Iterator[str]:
    with simulator_process(*flags) as url:
        yield url


@pytest.fixture(scope="module")
def llama_cpp_python() -> Iterator[str]:
    yield from _simulator("--chat-dialect", "llama-cpp-python", "--extra-models", "unmatched-model")


@pytest.fixture(scope="module")
def vllm() -> Iterator[str]:
    yield from _simulator("--chat-dialect", "vllm", "--extra-models", "unmatched-model")


@pytest.fixture(scope="module")
def openai_like() -> Iterator[str]:
    yield from _simulator("--extra-models", "unmatched-model")


# Each preset, against the simulator imitating a server of that kind (OpenAI's Chat stands in for Ollama's and the
# generic one's: they take the same json_schema response_format and stream usage).
_SERVER_OF = {
    "generic": "openai_like",
    "openai": "openai_like",
    "ollama": "openai_like",
    "vllm": "vllm",
    "llama.cpp": "llama_cpp_python",
}


@pytest.mark.parametrize("dialect", list(_SERVER_OF))
async def test_each_dialect_parses_counts_and_lists(
    dialect: str, request: pytest.FixtureRequest, key_prefix: str
) -> None:
    server: str = request.getfixturevalue(_SERVER_OF[dialect])
    async with serve_gateway(load_settings(upstreams=[_upstream(server, key_prefix, dialect=dialect)])) as gateway:
        parsed = await gateway.client.responses.parse(model="sim-1", input="Forecast?", text_format=Forecast)
        assert isinstance(parsed.output_parsed, Forecast)
        assert parsed.usage is not None
        assert parsed.usage.input_tokens > 0
        assert parsed.usage.output_tokens > 0
        # The provider lists "unmatched-model", which no pattern of this upstream admits: left out, no 404.
        assert [model.id async for model in gateway.client.models.list()] == ["sim-1"]


def _upstream(url: str, tag: str, **options: Any) -> dict[str, Any]:
    return {
        "name": "local",
        "kind": "chat",
        "base_url": f"{url}/v1",
        "models": ["sim-*"],
        "max_retries": 0,
        "headers": {"x-sim-tag": tag},
        **options,
    }


async def _last_completion(simulator: str, tag: str) -> dict[str, Any]:
    """The last chat completion the simulator was asked for (not a /tokenize call)."""
    return [body for body in await sim_requests(simulator, tag) if "stream" in body][-1]


@pytest.fixture
async def on_llama(llama_cpp_python: str, key_prefix: str) -> AsyncIterator[Gateway]:
    settings = load_settings(upstreams=[_upstream(llama_cpp_python, key_prefix, dialect="llama.cpp")])
    async with serve_gateway(settings) as served:
        served.extra["simulator"] = llama_cpp_python
        yield served


async def test_llama_cpp_structured_output_and_usage(on_llama: Gateway, key_prefix: str) -> None:
    parsed = await on_llama.client.responses.parse(model="sim-1", input="Forecast for Oslo?", text_format=Forecast)
    assert isinstance(parsed.output_parsed, Forecast)
    sent = await _last_completion(on_llama.extra["simulator"], key_prefix)
    assert sent["response_format"]["type"] == "json_object"  # the schema goes the way this server takes it
    assert sent["response_format"]["schema"]["properties"]["city"] == {"title": "City", "type": "string"}
    assert "stream_options" not in sent  # it streams no usage, so none is asked for
    # Usage never null: the server's /tokenize counted it.
    assert parsed.usage is not None
    assert parsed.usage.input_tokens > 0
    assert parsed.usage.output_tokens > 0
    assert parsed.metadata == {"usage": "counted by the gateway (tokenizer)"}
    counted = await on_llama.client.responses.input_tokens.count(model="sim-1", input="Forecast for Oslo?")
    plain = await on_llama.client.responses.create(model="sim-1", input="Forecast for Oslo?")
    assert plain.usage is not None
    assert plain.usage.input_tokens == counted.input_tokens


async def test_a_two_turn_conversation_on_llama_cpp(on_llama: Gateway) -> None:
    conversation = await on_llama.client.conversations.create()
    for text in ("Hello.", "And again."):
        turn = await on_llama.client.responses.create(model="sim-1", input=text, conversation=conversation.id)
        assert turn.status == "completed"
        assert turn.usage is not None


async def test_without_its_preset_llama_cpp_refuses_json_schema_and_the_client_sees_no_internals(
    llama_cpp_python: str, key_prefix: str
) -> None:
    settings = load_settings(upstreams=[_upstream(llama_cpp_python, key_prefix)])  # the generic dialect
    async with serve_gateway(settings) as gateway:
        with pytest.raises(openai.APIStatusError) as refused:
            await gateway.client.responses.parse(model="sim-1", input="Forecast?", text_format=Forecast)
    assert "llama_cpp" not in str(refused.value.body)


async def test_models_list_although_the_provider_lists_an_unmatched_model(on_llama: Gateway) -> None:
    listed = [model.id async for model in on_llama.client.models.list()]
    assert listed == ["sim-1"]  # "unmatched-model" matches no pattern of this upstream: left out, not a 404


@pytest.mark.parametrize("json_schema", ["response_format", "guided_json"])
async def test_vllm_structured_output(vllm: str, key_prefix: str, json_schema: str) -> None:
    upstream = _upstream(vllm, key_prefix, dialect="vllm", json_schema=json_schema)
    async with serve_gateway(load_settings(upstreams=[upstream])) as gateway:
        parsed = await gateway.client.responses.parse(model="sim-1", input="Forecast?", text_format=Forecast)
        assert isinstance(parsed.output_parsed, Forecast)
        assert parsed.usage is not None
        assert parsed.usage.input_tokens > 0
        sent = await _last_completion(vllm, key_prefix)
    assert ("guided_json" in sent) == (json_schema == "guided_json")
    assert "max_completion_tokens" not in sent or sent["max_completion_tokens"] > 0


async def _chat_server_without_usage_or_tokenizer(hanging_tokenizer: bool = False) -> TestServer:
    async def complete(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        head = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        for delta, finish in (({"role": "assistant", "content": "Twelve chars"}, None), ({}, "stop")):
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await reply.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await reply.write(b"data: [DONE]\n\n")
        return reply

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.json_response({"count": 1})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    if hanging_tokenizer:
        app.router.add_post("/tokenize", hang)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize("hanging_tokenizer", [False, True])
async def test_usage_is_estimated_and_marked_when_nothing_can_count_it(
    hanging_tokenizer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No usage in the stream and no tokenizer (or one that never answers: the wait for it is bounded)."""
    monkeypatch.setattr(runs.upstream.chat, "TOKENIZE_TIMEOUT_SECONDS", 0.3)
    provider = await _chat_server_without_usage_or_tokenizer(hanging_tokenizer)
    try:
        upstream = {"name": "bare", "kind": "chat", "base_url": str(provider.make_url("/v1")), "max_retries": 0}
        async with serve_gateway(load_settings(upstreams=[upstream])) as gateway:
            response = await gateway.client.responses.create(model="m", input="hi", metadata={"mine": "kept"})
    finally:
        await provider.close()
    assert response.output_text == "Twelve chars"
    assert response.usage is not None
    assert response.usage.output_tokens == 3  # 12 characters at four per token
    assert response.metadata == {"mine": "kept", "usage": "counted by the gateway (estimated)"}


def test_presets_and_their_overrides() -> None:
    def spec(**options: Any) -> Any:
        upstream = {"name": "x", "kind": "chat", "base_url": "http://x/v1", **options}
        return load_settings(upstreams=[upstream]).upstreams[0].to_spec()

    openai_like = spec(dialect="openai")
    assert (openai_like.max_tokens_field, openai_like.developer_role, openai_like.reasoning_effort) == (
        "max_completion_tokens",
        True,
        True,
    )
    llama = spec(dialect="llama.cpp", stream_usage=True)  # an option wins over its preset
    assert (llama.json_schema, llama.stream_usage, llama.max_tokens_field) == ("json_object_schema", True, "max_tokens")
    assert spec().json_schema == "response_format"  # generic: what the gateway always sent


_NAMESPACE: Any = {
    "type": "namespace",
    "name": "repo",
    "description": "Repository tools",
    "tools": [
        {
            "type": "function",
            "name": "read_file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        }
    ],
}


@pytest.fixture
async def dropping(simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    upstream = {**_upstream(simulator_url, key_prefix), "models": ["*"], "unsupported": "drop"}
    async with serve_gateway(load_settings(upstreams=[upstream])) as served:
        served.extra["simulator"] = simulator_url
        yield served


async def test_namespace_tools_are_flattened_and_their_calls_come_back_namespaced(
    dropping: Gateway, key_prefix: str
) -> None:
    client = dropping.client
    called = await client.responses.create(model="sim-1", input="Read README.md", tools=[_NAMESPACE])
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert (call.namespace, call.name) == ("repo", "read_file")
    sent = await _last_completion(dropping.extra["simulator"], key_prefix)
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["repo__read_file"]
    answer: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "# README"}]
    answered = await client.responses.create(
        model="sim-1", previous_response_id=called.id, input=answer, tools=[_NAMESPACE]
    )
    assert answered.status == "completed"
    sent = await _last_completion(dropping.extra["simulator"], key_prefix)
    assert sent["messages"][-2]["tool_calls"][0]["function"]["name"] == "repo__read_file"  # history flattened too


async def test_what_chat_cannot_do_is_dropped_and_noted_or_refused(dropping: Gateway, simulator_url: str) -> None:
    hosted: Any = [{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {"type": "object"}}]
    body: dict[str, Any] = {
        "model": "sim-1",
        "input": "hi",
        "tools": hosted,
        "tool_choice": "none",
        "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"],  # a no-op on Chat, under either policy
    }
    response = await dropping.client.responses.create(**body)
    assert response.status == "completed"
    assert response.metadata is not None
    assert response.metadata["dropped"] == "tools[0], reasoning.summary"
    upstream = {"name": "strict", "kind": "chat", "base_url": f"{simulator_url}/v1", "max_retries": 0}
    async with serve_gateway(load_settings(upstreams=[upstream])) as rejecting:
        with pytest.raises(openai.BadRequestError) as refused:
            await rejecting.client.responses.create(**body)
        assert refused.value.param == "tools[0]"
        fine = await rejecting.client.responses.create(
            model="sim-1", input="hi", include=["reasoning.encrypted_content"]
        )
        assert fine.status == "completed"
