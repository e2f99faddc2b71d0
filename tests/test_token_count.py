"""`client.responses.input_tokens.count` through the gateway: counted by the upstream that would run the request
(a Responses provider's own endpoint, a Chat provider's tokenizer), estimated where the provider has neither."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import load_settings
from runs.token_count import COUNT_SOURCE_HEADER
from runs.token_estimate import estimate_tokens
from tests.conftest import Gateway, serve_gateway
from tests.helpers import upstream_calls

_TOOL: Any = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}


def _upstream(kind: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": f"{kind}-sim", "kind": kind, "base_url": f"{url}/v1", "max_retries": 0, **extra}


@pytest.fixture(params=["responses", "chat"])
async def counting(
    request: pytest.FixtureRequest, simulator_url: str, storage_url: str, key_prefix: str
) -> AsyncIterator[Gateway]:
    """A gateway whose one upstream is the simulator, spoken to as a Responses or a Chat provider."""
    settings = load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix},
        upstreams=[_upstream(request.param, simulator_url, send_metadata=True)],
    )
    async with serve_gateway(settings) as served:
        served.extra["kind"] = request.param
        yield served


async def _count(gateway: Gateway, **body: Any) -> tuple[int, str]:
    raw = await gateway.client.responses.input_tokens.with_raw_response.count(**body)
    return raw.parse().input_tokens, raw.headers[COUNT_SOURCE_HEADER]


async def test_the_count_is_what_the_request_would_use(counting: Gateway, simulator_url: str, key_prefix: str) -> None:
    source = "upstream" if counting.extra["kind"] == "responses" else "tokenizer"
    body: dict[str, Any] = {"model": "sim-1", "instructions": "Be brief.", "input": "How many tokens is this question?"}
    tokens, counted_by = await _count(counting, **body)
    created = await counting.client.responses.create(**body, metadata={"sim_tag": key_prefix})
    assert created.usage is not None
    assert (tokens, counted_by) == (created.usage.input_tokens, source)
    assert tokens > 5

    # A continuation is counted with the history the gateway keeps, as the create would send it.
    follow: dict[str, Any] = {"model": "sim-1", "previous_response_id": created.id, "input": "And now?"}
    tokens, _ = await _count(counting, **follow)
    continued = await counting.client.responses.create(**follow, metadata={"sim_tag": key_prefix})
    assert continued.usage is not None
    assert tokens == continued.usage.input_tokens > created.usage.input_tokens
    # …and `model` may be left out there: it is the previous response's.
    assert (await _count(counting, previous_response_id=created.id, input="And now?"))[0] == tokens


async def test_bad_count_requests_are_refused_before_the_provider_is_asked(
    counting: Gateway, simulator_url: str, key_prefix: str
) -> None:
    before = await upstream_calls(simulator_url, key_prefix)
    with pytest.raises(openai.BadRequestError) as missing:
        await counting.client.responses.input_tokens.count(input="hi")
    assert missing.value.param == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        await counting.client.responses.input_tokens.count(model="sim-1", previous_response_id="resp_nope")
    assert unknown.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError) as unknown_without_model:
        await counting.client.responses.input_tokens.count(previous_response_id="resp_nope")
    assert unknown_without_model.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as both:
        await counting.client.responses.input_tokens.count(
            model="sim-1", previous_response_id="resp_x", conversation="conv_y", input="hi"
        )
    assert both.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as orphan:
        await counting.client.responses.input_tokens.count(
            model="sim-1", input=[{"type": "function_call_output", "call_id": "call_none", "output": "x"}]
        )
    assert orphan.value.param == "input[0].call_id"
    assert await upstream_calls(simulator_url, key_prefix) == before


async def test_a_provider_that_cannot_count_gets_an_estimate_marked_as_such(simulator_without_compact: str) -> None:
    settings = load_settings(upstreams=[_upstream("responses", simulator_without_compact)])
    body: dict[str, Any] = {"model": "sim-1", "input": "a" * 400, "tools": [_TOOL]}
    async with serve_gateway(settings) as gateway:
        tokens, counted_by = await _count(gateway, **body)
    assert counted_by == "estimate"
    assert tokens == estimate_tokens({"input": "a" * 400, "tools": [_TOOL]})
    assert 100 <= tokens <= 140  # about four characters per token


async def _llama_cpp_like(tokenize: bool) -> TestServer:
    """A Chat provider whose `/tokenize` answers as llama.cpp's does (tokens only), or that has none."""

    async def tokens_only(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"tokens": list(range(len(body["content"].split())))})

    app = web.Application()
    if tokenize:
        app.router.add_post("/tokenize", tokens_only)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize("tokenize", [True, False])
async def test_chat_providers_are_counted_by_their_tokenizer_or_estimated(tokenize: bool) -> None:
    provider = await _llama_cpp_like(tokenize)
    try:
        settings = load_settings(upstreams=[_upstream("chat", str(provider.make_url("")).rstrip("/"))])
        async with serve_gateway(settings) as gateway:
            tokens, counted_by = await _count(gateway, model="m", instructions="one two", input="three four five")
    finally:
        await provider.close()
    if tokenize:
        assert (tokens, counted_by) == (5, "tokenizer")  # the messages' text, joined, as llama.cpp counts it
    else:
        assert counted_by == "estimate"
        assert tokens > 0


async def test_counting_and_compacting_take_a_slot_like_a_run(simulator_url: str) -> None:
    """Calls to the provider outside a run count against the instance's limit: a full instance refuses them."""
    settings = load_settings(upstreams=[_upstream("responses", simulator_url)], runs={"max_concurrent": 1})
    async with serve_gateway(settings) as gateway:
        client = gateway.client
        running = await client.responses.create(
            model="sim-1", input="x", background=True, metadata={"sim_fault": "hang"}
        )
        with pytest.raises(openai.RateLimitError):
            await client.responses.input_tokens.count(model="sim-1", input="hi")
        with pytest.raises(openai.RateLimitError):
            await client.responses.compact(model="sim-1", input="hi")
        await client.responses.cancel(running.id)
        assert (await client.responses.input_tokens.count(model="sim-1", input="hi")).input_tokens > 0
