"""The upstream HTTP client against a real local server: SSE however it is cut, and every way a provider can fail
turned into the UpstreamFailure the run's retries expect."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from runs.upstream.base import UpstreamFailure, UpstreamSpec
from runs.upstream.client import PLACEHOLDER_API_KEY, UpstreamClient, request_written
from runs.upstream.failures import connection_failure, retry_after_seconds
from tests.conftest import free_port

EVENTS: list[dict[str, Any]] = [
    {"type": "response.created", "n": 0},
    {"type": "response.output_text.delta", "delta": "héllo"},
]
SECRET = "stack trace at internal-host-7:/srv/model"


def sse(events: list[dict[str, Any]], ending: bytes = b"\n") -> bytes:
    return b"".join(b"event: " + e["type"].encode() + ending + b"data: " + orjson.dumps(e) + ending * 2 for e in events)


@dataclass
class Provider:
    """The test server: a scenario per path prefix, and what it saw."""

    server: TestServer
    requests: list[web.Request] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    clients: list[UpstreamClient] = field(default_factory=list)

    def client(self, scenario: str, base_path: str = "/v1", **spec: Any) -> UpstreamClient:
        base_url = str(self.server.make_url(f"/{scenario}{base_path}"))
        client = UpstreamClient(UpstreamSpec(name="prov", kind="chat", base_url=base_url, **spec))
        self.clients.append(client)
        return client


async def stream_of(request: web.Request, *chunks: bytes, delay: float = 0.0) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
        if delay:
            await asyncio.sleep(delay)
    return response


def error_response(status: int, body: bytes, content_type: str, **headers: str) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": content_type, **headers})


def scenarios(provider: Provider) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    async def bytewise(request: web.Request) -> web.StreamResponse:
        payload = sse(EVENTS) + b"data: [DONE]\n\n"
        return await stream_of(request, *(payload[i : i + 1] for i in range(len(payload))), delay=0.001)

    async def crlf(request: web.Request) -> web.StreamResponse:
        return await stream_of(request, sse(EVENTS, b"\r\n"), b"data: [DONE]\r\n\r\n")

    async def cr(request: web.Request) -> web.StreamResponse:
        return await stream_of(request, sse(EVENTS, b"\r"), b"data: [DONE]\r\r")

    async def comments(request: web.Request) -> web.StreamResponse:
        return await stream_of(
            request,
            b': hello\n\n:ping\nevent:x\ndata:{"type":\ndata: "a"}\n\n',
            b"data: null\n\n: bye\n\ndata: [DONE]\n\n",  # JSON that is no object is skipped, not a broken stream
        )

    async def after_done(request: web.Request) -> web.StreamResponse:
        return await stream_of(request, sse(EVENTS[:1]) + b"data: [DONE]\n\n" + sse(EVENTS[1:]))

    async def lingers_after_done(request: web.Request) -> web.StreamResponse:
        response = await stream_of(request, sse(EVENTS), b"data: [DONE]\n\n")
        await asyncio.sleep(0.02)  # the body's end comes a little after [DONE]
        return response

    async def error_event(request: web.Request) -> web.StreamResponse:
        flat = {"type": "error", "code": "server_error", "message": "flat", "param": None}
        return await stream_of(request, b"event: error\ndata: " + orjson.dumps(flat) + b"\n\n")

    async def error_event_wrapped(request: web.Request) -> web.StreamResponse:
        wrapped = {"error": {"message": "overloaded now", "code": "overloaded", "type": "server_error"}}
        return await stream_of(request, sse(EVENTS[:1]), b"event: error\ndata: " + orjson.dumps(wrapped) + b"\n\n")

    async def data_error(request: web.Request) -> web.StreamResponse:
        return await stream_of(
            request, b'data: {"x": 1, "error": null}\n\n', b'data: {"error": {"code": 42, "type": "t"}}\n\n'
        )

    async def cut(request: web.Request) -> web.StreamResponse:
        response = await stream_of(request, sse(EVENTS))
        assert request.transport is not None
        request.transport.abort()  # no terminating chunk: the body is incomplete
        return response

    async def ends(request: web.Request) -> web.StreamResponse:
        return await stream_of(request, sse(EVENTS))  # a complete body without [DONE]

    async def bad_request(request: web.Request) -> web.StreamResponse:
        envelope = {"error": {"message": "bad thing", "type": "invalid_request_error", "code": "bad_code"}}
        return error_response(400, orjson.dumps(envelope), "application/json")

    async def html_502(request: web.Request) -> web.StreamResponse:
        return error_response(502, f"<html><body>{SECRET}</body></html>".encode(), "text/html")

    async def rate_limited(request: web.Request) -> web.StreamResponse:
        envelope = {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}
        return error_response(429, orjson.dumps(envelope), "application/json", **{"retry-after-ms": "1500"})

    async def unavailable(request: web.Request) -> web.StreamResponse:
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        return error_response(503, b"", "text/plain", **{"Retry-After": when})

    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)  # never answers; the client's leaving cancels this
        raise AssertionError("unreachable")

    async def silent_mid_stream(request: web.Request) -> web.StreamResponse:
        response = await stream_of(request, sse(EVENTS[:1]))
        await asyncio.sleep(30)
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        response = await stream_of(request)
        try:
            for n in range(100_000):
                await response.write(sse([{"type": "response.output_text.delta", "n": n}]))
                await asyncio.sleep(0.005)
        except (ConnectionResetError, asyncio.CancelledError):
            provider.gone.set()
            raise
        return response

    async def models(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.json_response({"object": "list", "data": [{"id": "m-1"}, {"id": "m-2"}, {"no": "id"}]})
        return await bytewise(request)

    async def not_json(request: web.Request) -> web.StreamResponse:
        return await stream_of(request, sse(EVENTS[:1]), b"data: {" + SECRET.encode() + b"\n\n")

    return {name: handler for name, handler in locals().items() if callable(handler)}


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    app = web.Application()
    provider = Provider(TestServer(app, host="127.0.0.1"))
    handlers = scenarios(provider)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        provider.requests.append(request)
        provider.bodies.append(orjson.loads(await request.read()) if request.can_read_body else None)
        provider.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return await handlers[request.match_info["scenario"]](request)

    app.router.add_route("*", "/{scenario}/v1/{tail:.*}", dispatch)
    await provider.server.start_server()
    yield provider
    for client in provider.clients:
        await client.close()
    await provider.server.close()


async def collect(client: UpstreamClient, path: str = "/chat/completions", **body: Any) -> list[dict[str, Any]]:
    return [item async for items in client.stream_json(path, body or {"model": "m"}) for item in items]


async def failure_of(client: UpstreamClient, path: str = "/chat/completions") -> UpstreamFailure:
    return (await read_until_failure(client, path))[1]


async def read_until_failure(
    client: UpstreamClient, path: str = "/responses"
) -> tuple[list[dict[str, Any]], UpstreamFailure]:
    """What the stream yielded before it failed, and the failure; the test fails if it does not fail."""
    seen: list[dict[str, Any]] = []
    try:
        async for items in client.stream_json(path, {}):
            seen.extend(items)
    except UpstreamFailure as failure:
        return seen, failure
    raise AssertionError(f"no failure after {seen}")


# Reading the stream.


@pytest.mark.parametrize("scenario", ["bytewise", "crlf", "cr"])
async def test_events_whatever_the_chunks_and_line_endings(provider: Provider, scenario: str) -> None:
    assert await collect(provider.client(scenario)) == EVENTS


async def test_comments_bare_colons_and_multiline_data(provider: Provider) -> None:
    assert await collect(provider.client("comments")) == [{"type": "a"}]


async def test_nothing_after_done(provider: Provider) -> None:
    assert await collect(provider.client("after_done")) == EVENTS[:1]


async def test_a_complete_body_without_done_just_ends(provider: Provider) -> None:
    # The adapters decide whether that is a finished turn; the client only reports what came.
    assert await collect(provider.client("ends")) == EVENTS


async def test_the_request_joins_the_path_to_the_base_url_and_sends_the_body(provider: Provider) -> None:
    await collect(provider.client("bytewise"), "/responses", model="m", input="hi")
    await collect(provider.client("bytewise", base_path="/v1/"))
    assert [request.path for request in provider.requests] == [
        "/bytewise/v1/responses",
        "/bytewise/v1/chat/completions",
    ]
    assert provider.requests[0].method == "POST"
    assert provider.bodies[0] == {"model": "m", "input": "hi"}
    assert provider.requests[0].headers["Content-Type"] == "application/json"
    assert provider.requests[0].headers["Accept"] == "text/event-stream"


async def test_keys_and_extra_headers(provider: Provider) -> None:
    configured = provider.client("bytewise", api_key="sk-conf", extra_headers={"X-Org": "acme", "accept": "x/y"})
    await collect(configured)
    async with contextlib.aclosing(configured.stream_json("/chat/completions", {}, api_key="sk-client")) as events:
        await anext(events)
    await collect(provider.client("bytewise"))
    sent = [request.headers for request in provider.requests]
    assert [headers["Authorization"] for headers in sent] == [
        "Bearer sk-conf",
        "Bearer sk-client",  # pass-through: the client's own key replaces the configured one
        f"Bearer {PLACEHOLDER_API_KEY}",
    ]
    assert sent[0]["X-Org"] == sent[1]["X-Org"] == "acme"
    assert sent[0]["Accept"] == "x/y"  # the configured headers win, as with the SDK's default_headers
    assert "X-Org" not in sent[2]


async def test_a_finished_stream_gives_its_connection_back(provider: Provider) -> None:
    client = provider.client("lingers_after_done")
    await collect(client)
    await collect(client)
    assert provider.peers[0] == provider.peers[1]  # the body's end after [DONE] was waited for


async def test_closing_early_drops_the_connection_at_once(provider: Provider) -> None:
    async with contextlib.aclosing(provider.client("endless").stream_json("/responses", {})) as events:
        assert (await anext(events))[0]["n"] == 0
    await asyncio.wait_for(provider.gone.wait(), 2)


async def test_cancelling_the_reader_drops_the_connection(provider: Provider) -> None:
    client = provider.client("endless")
    started = asyncio.Event()

    async def read() -> None:
        async for _ in client.stream_json("/responses", {}):
            started.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(started.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(provider.gone.wait(), 2)


async def test_models(provider: Provider) -> None:
    assert await provider.client("models").list_models() == ["m-1", "m-2"]
    assert provider.requests[0].method == "GET"
    assert provider.requests[0].path == "/models/v1/models"
    with pytest.raises(UpstreamFailure) as caught:
        await provider.client("bad_request").list_models()
    assert caught.value.status == 400


# Errors in the stream.


async def test_a_flat_error_event_is_passed_on_as_the_sdk_did(provider: Provider) -> None:
    # The SDK raised only for data with an `error` key; a flat `type: error` event is the run's to judge.
    assert await collect(provider.client("error_event")) == [
        {"type": "error", "code": "server_error", "message": "flat", "param": None}
    ]


async def test_an_error_object_in_the_stream_is_a_retryable_failure(provider: Provider) -> None:
    seen, failure = await read_until_failure(provider.client("error_event_wrapped"))
    assert seen == EVENTS[:1]
    assert (failure.message, failure.code, failure.status, failure.retryable) == (
        "upstream 'prov' failed: overloaded now",
        "overloaded",
        None,
        True,
    )


async def test_an_event_that_is_not_json_is_a_retryable_failure_that_does_not_echo_it(provider: Provider) -> None:
    seen, failure = await read_until_failure(provider.client("not_json"))
    assert seen == EVENTS[:1]
    assert failure.retryable
    assert SECRET not in failure.message
    assert "not JSON" in failure.message


async def test_an_error_without_a_message_gets_the_sdks_words(provider: Provider) -> None:
    seen, failure = await read_until_failure(provider.client("data_error"))
    assert seen == [{"x": 1, "error": None}]  # a null error is no error
    assert failure.message == "upstream 'prov' failed: An error occurred during streaming"
    assert failure.code == "42"
    assert failure.retryable


# Statuses.


async def test_an_error_status_with_a_json_body(provider: Provider) -> None:
    failure = await failure_of(provider.client("bad_request"))
    assert (failure.message, failure.status, failure.code, failure.retryable, failure.retry_after_seconds) == (
        "bad thing",
        400,
        "bad_code",
        False,
        None,
    )


async def test_an_error_status_with_a_body_that_is_not_json_keeps_it_to_itself(provider: Provider) -> None:
    failure = await failure_of(provider.client("html_502"))
    assert (failure.message, failure.status, failure.code, failure.retryable) == ("Error code: 502", 502, None, True)
    assert SECRET not in failure.message


async def test_429_with_retry_after_ms(provider: Provider) -> None:
    failure = await failure_of(provider.client("rate_limited"))
    assert (failure.status, failure.code, failure.retryable, failure.retry_after_seconds) == (
        429,
        "rate_limit_exceeded",
        True,
        1.5,
    )


async def test_503_with_retry_after_as_an_http_date(provider: Provider) -> None:
    failure = await failure_of(provider.client("unavailable"))
    assert (failure.status, failure.retryable, failure.message) == (503, True, "Error code: 503")
    assert failure.retry_after_seconds is not None
    assert 25 < failure.retry_after_seconds <= 30


# The connection.


async def test_a_stream_cut_mid_way_is_a_retryable_connection_failure(provider: Provider) -> None:
    seen, failure = await read_until_failure(provider.client("cut"))
    assert seen == EVENTS
    assert (failure.message, failure.retryable) == ("upstream 'prov' unreachable: Connection error.", True)


@pytest.mark.parametrize("scenario", ["silent", "silent_mid_stream"])
async def test_a_provider_that_goes_quiet_times_out(provider: Provider, scenario: str) -> None:
    client = provider.client(scenario, read_timeout_seconds=0.3)
    started = time.monotonic()
    failure = await failure_of(client)
    assert (failure.message, failure.retryable, failure.status) == (
        "upstream 'prov' unreachable: Request timed out.",
        True,
        None,
    )
    assert time.monotonic() - started < 5


async def test_a_refused_connection(provider: Provider) -> None:
    client = UpstreamClient(UpstreamSpec("down", "responses", f"http://127.0.0.1:{free_port()}/v1"))
    provider.clients.append(client)
    failure = await failure_of(client, "/responses")
    assert (failure.message, failure.retryable, failure.status) == (
        "upstream 'down' unreachable: Connection error.",
        True,
        None,
    )
    with pytest.raises(UpstreamFailure, match="unreachable"):
        await client.list_models()


def test_a_connect_timeout_reads_as_a_timeout() -> None:
    assert (
        connection_failure("p", aiohttp.ConnectionTimeoutError()).message
        == "upstream 'p' unreachable: Request timed out."
    )
    assert (
        connection_failure("p", aiohttp.ServerDisconnectedError()).message
        == "upstream 'p' unreachable: Connection error."
    )


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "soon", "retry-after": "9"}) == 9.0
    assert retry_after_seconds({"retry-after": "-3"}) == 0.0
    # Unreadable values fall back to the run's own backoff instead of breaking the failure's construction.
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after-ms": "nan"}) is None
    assert retry_after_seconds({"retry-after": "inf"}) is None
    # A date without a zone is UTC, as the SDK reads it, not the gateway's local time.
    in_a_minute = time.gmtime(time.time() + 60)
    naive = time.strftime("%a, %d %b %Y %H:%M:%S", in_a_minute)
    assert 55 < (retry_after_seconds({"retry-after": naive}) or 0) <= 60
    assert retry_after_seconds({}) is None
    assert retry_after_seconds(None) is None


async def test_close_is_safe_twice_and_before_use(provider: Provider) -> None:
    client = provider.client("bytewise")
    await client.close()
    assert await collect(client) == EVENTS
    await client.close()
    await client.close()


async def test_a_callback_in_the_context_hears_that_the_request_has_left(provider: Provider) -> None:
    """runs/upstream/head_start.py waits on it: called once the body is written, before any answer comes."""
    left = asyncio.Event()
    calls: list[None] = []

    def written() -> None:
        calls.append(None)
        left.set()

    async def call() -> None:
        request_written.set(written)  # in this task's context only
        await collect(provider.client("silent"), model="m", input="x" * 100_000)

    task = asyncio.create_task(call())
    await asyncio.wait_for(left.wait(), 5)
    assert calls == [None]
    assert not task.done()  # before any answer
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert request_written.get() is None  # the test's own context was never touched
