"""Provider errors reach clients mapped and without the provider's insides; the full text is in the gateway's log
under the request's id (`x-request-id`, which every response carries)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import load_settings
from tests.conftest import Gateway, serve_gateway

# What llama-cpp-python answered a json_schema response_format with: a 500 whose message names its own source.
_LEAKY = "Input should be 'text' or 'json_object' (/opt/venv/lib/python3.11/site-packages/llama_cpp/server/app.py:412)"
_TRACEBACK = 'Traceback (most recent call last):\n  File "/srv/model/serve.py", line 88, in generate\nValueError: bad'


@pytest.fixture
async def leaky_provider() -> AsyncIterator[str]:
    """A Chat provider that refuses with its internals in the message: a 500 with a path, a 400 with a trace."""

    async def refuse(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("temperature") == 0.5:
            error: dict[str, Any] = {"message": _TRACEBACK, "type": "invalid_request_error", "code": None}
            return web.json_response({"error": error}, status=400)
        return web.json_response({"error": {"message": _LEAKY, "type": "server_error"}}, status=500)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


@pytest.fixture
async def leaky_gateway(leaky_provider: str) -> AsyncIterator[Gateway]:
    upstream = {"name": "leaky", "kind": "chat", "base_url": leaky_provider, "max_retries": 0}
    async with serve_gateway(load_settings(upstreams=[upstream])) as served:
        yield served


async def test_a_provider_error_reaches_the_client_without_its_internals(
    leaky_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(openai.InternalServerError) as server_error:
        await leaky_gateway.client.responses.create(model="m", input="hi", extra_headers={"x-request-id": "trace-me-1"})
    assert "llama_cpp" not in str(server_error.value.body)
    assert server_error.value.response.headers["x-request-id"] == "trace-me-1"
    with pytest.raises(openai.BadRequestError) as refused:
        await leaky_gateway.client.responses.create(model="m", input="hi", temperature=0.5)
    assert "serve.py" not in str(refused.value.body)
    assert "Traceback" not in str(refused.value.body)
    assert refused.value.message
    refused_id = refused.value.response.headers["x-request-id"]
    # The operator still finds every word, under the id the client was given.
    logged = caplog.text
    assert "trace-me-1" in logged
    assert "llama_cpp/server/app.py:412" in logged
    assert refused_id in logged
    assert "serve.py" in logged


async def test_a_streamed_failure_carries_the_cleaned_message(leaky_gateway: Gateway) -> None:
    stream = await leaky_gateway.client.responses.create(model="m", input="hi", stream=True, background=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.error is not None
    assert "llama_cpp" not in failed.error.message


async def test_every_response_has_a_request_id(leaky_gateway: Gateway) -> None:
    listed = await leaky_gateway.client.models.with_raw_response.list()
    assert listed.headers["x-request-id"].startswith("req_")
    odd = await leaky_gateway.client.models.with_raw_response.list(extra_headers={"x-request-id": "bad id\twith tab"})
    assert odd.headers["x-request-id"].startswith("req_")  # not ours to log as it was sent
    async with leaky_gateway.http.get("/v1/nowhere") as missing:
        assert missing.status == 404
        assert missing.headers["x-request-id"].startswith("req_")
