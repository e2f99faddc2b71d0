"""The HTTP client every adapter uses: one aiohttp session per provider, streamed answers split as SSE."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from contextvars import ContextVar
from typing import Any

import aiohttp
import orjson
import yarl
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from runs.upstream.base import UpstreamFailure, UpstreamSpec
from runs.upstream.failures import connection_failure, status_failure, stream_failure
from runs.upstream.sse import SSESplitter

# Sent when no key is configured, as the SDK-based client did; local providers (vLLM, llama.cpp, Ollama) ignore it.
PLACEHOLDER_API_KEY = "not-needed"
# After `data: [DONE]`, how long to wait for the end of the body so the connection can be reused (as the SDK did).
DONE_DRAIN_SECONDS = 0.1
# How long an idle connection to the provider is kept for the next request (aiohttp's default is 15 s). Agents
# call in bursts with pauses between turns; a burst that finds its connections closed opens them all at once, and
# that alone added ~5 ms to the slowest of 20 first tokens (bench (a')). A connection the provider closed sooner
# is not reused (the pool drops it once its close is seen); a request that races the provider's close fails as a
# connection error, which is retried while nothing was emitted.
UPSTREAM_KEEPALIVE_SECONDS = 60.0
# What the transport raises for a refused, dropped, cut or silent connection (timeouts are asyncio's).
_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# A provider's way of saying it has no such endpoint (a feature it lacks, not a failure).
_NO_SUCH_ENDPOINT = frozenset({404, 405, 501})

# Called once a provider request made in this context has been written to its connection. A head start sets it
# for its call (runs/upstream/head_start.py), so that admission's work can wait until the request has left. A
# context variable, as a trace's context is: the call passes through retries, tracing and an adapter, none of
# which has a use for it.
request_written: ContextVar[Callable[[], None] | None] = ContextVar("request_written", default=None)


class _RequestBody(aiohttp.BytesPayload):
    """A JSON request body that calls `written` once aiohttp has written it (after the headers it goes out with).
    aiohttp 3.10 writes a body with `write`, later versions with `write_with_length`; `written` is idempotent."""

    def __init__(self, value: bytes, written: Callable[[], None] | None) -> None:
        super().__init__(value, content_type="application/json")
        self._written = written

    async def write(self, writer: AbstractStreamWriter) -> None:
        await super().write(writer)
        if self._written is not None:
            self._written()

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await super().write_with_length(writer, content_length)
        if self._written is not None:
            self._written()


class UpstreamClient:
    """A provider's HTTP endpoint. It has no retries of its own: the run retries, and only before any output.
    Its failures are UpstreamFailures shaped in `runs.upstream.failures`."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self._name = spec.name
        # Joined as the openai SDK joins them: `http://host/v1` + `/responses` is `http://host/v1/responses`.
        self._base_url = spec.base_url if spec.base_url.endswith("/") else f"{spec.base_url}/"
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=spec.connect_timeout_seconds, sock_read=spec.read_timeout_seconds
        )
        self._stream_headers = _headers(spec, accept="text/event-stream")
        self._json_headers = _headers(spec, accept="application/json")
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use rather than in __init__: a session belongs to the loop that runs it.
        if self._session is None:
            # No pool limit: each open stream holds a connection, and admission already bounds how many run.
            # No cookie jar: providers' cookies are nobody's business here, and the jar is work on every request.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _url(self, path: str) -> yarl.URL:
        url = self._urls.get(path)
        if url is None:  # parsed once per path: building a URL is a noticeable part of a request's cost
            if path.startswith("//"):  # from the server's root, not under the API's base path (`/tokenize`)
                url = yarl.URL(self._base_url).with_path(_server_root(yarl.URL(self._base_url).path) + path[2:])
            else:
                url = yarl.URL(self._base_url + path.lstrip("/"))
            self._urls[path] = url
        return url

    async def _send(
        self, method: str, path: str, headers: CIMultiDict[str], data: bytes | None = None
    ) -> aiohttp.ClientResponse:
        """The provider's 2xx response, its body unread; anything else raised as an UpstreamFailure."""
        url = self._url(path)
        payload = None if data is None else _RequestBody(data, request_written.get())
        try:
            response = await self._http().request(method, url, data=payload, headers=headers)
        except _TRANSPORT_ERRORS as error:
            raise connection_failure(self._name, error) from error
        if 200 <= response.status < 300:
            return response
        try:
            body = await response.read()
        except _TRANSPORT_ERRORS:
            body = b""  # the status alone still says what happened
        finally:
            response.release()
        raise status_failure(response.status, body, response.headers)

    async def stream_json(
        self,
        path: str,
        body: dict[str, Any],
        api_key: str | None = None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """POST `body` to `path` and yield the streamed JSON objects as plain dicts, a list of those that arrived
        together at a time (so that what arrived together is stored together), until `[DONE]` or the end of the
        body. `api_key` (a client's own key, for pass-through upstreams) replaces the configured one;
        `trace_headers` (W3C trace context) are added. Closing the generator early drops the connection at once,
        so the provider stops generating."""
        headers = self._stream_headers
        if api_key or trace_headers:
            headers = headers.copy()
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            if trace_headers:
                headers.update(trace_headers)
        response = await self._send("POST", path, headers, orjson.dumps(body))
        splitter = SSESplitter()
        silence = _SilenceWatch(response, self._timeout.sock_read)
        try:
            try:
                async for chunk in response.content.iter_any():
                    items: list[dict[str, Any]] = []
                    for _, data in splitter.feed(chunk):
                        failure = None
                        try:
                            item = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            # The provider's fault, not the gateway's: a broken turn (retried if nothing was
                            # emitted yet), named without echoing what it sent.
                            item = None
                            failure = UpstreamFailure(
                                f"upstream {self._name!r} sent an event that is not JSON.", retryable=True
                            )
                        if isinstance(item, dict) and item.get("error"):
                            # Any object with a truthy `error` ends the stream, as the openai SDK's reader decided.
                            failure = stream_failure(self._name, item["error"])
                        if failure is not None:
                            if items:  # what came before the failure is the provider's answer so far
                                yield items
                            raise failure
                        if isinstance(item, dict):
                            items.append(item)
                    if items:
                        yield items
                    if splitter.done:
                        await _drain(response)
                        return
            except _TRANSPORT_ERRORS as error:
                raise connection_failure(self._name, error) from error
        finally:
            silence.stop()
            _let_go(response)

    async def post_json(self, path: str, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any] | None:
        """POST `body` to `path` and return the JSON object it answers, or None when the provider has no such
        endpoint (404, 405, 501): the caller then does without it. `//path` is from the server's root."""
        headers = self._json_headers
        if api_key:
            headers = headers.copy()
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            response = await self._send("POST", path, headers, orjson.dumps(body))
        except UpstreamFailure as failure:
            # A 404 about something else (OpenAI's `model_not_found`) is the provider's answer, not a lack.
            if failure.status in _NO_SUCH_ENDPOINT and failure.code in (None, "unknown_url", "not_found"):
                return None
            raise
        payload = await self._body(response)
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamFailure(f"upstream {self._name!r} answered {path} with something other than a JSON object.")
        return answer

    async def list_models(self) -> list[str]:
        """The model ids the provider lists at `GET /models`."""
        response = await self._send("GET", "/models", self._json_headers)
        page = orjson.loads(await self._body(response))
        data = page.get("data") if isinstance(page, dict) else None
        return [str(entry["id"]) for entry in data or [] if isinstance(entry, dict) and "id" in entry]

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        """A 2xx response's whole body; its connection goes back to the pool."""
        try:
            return await response.read()
        except _TRANSPORT_ERRORS as error:
            raise connection_failure(self._name, error) from error
        finally:
            response.release()

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class _SilenceWatch:
    """Ends a provider's stream once it has sent nothing for `timeout` seconds, as aiohttp's read timeout (which
    still covers the wait for the headers) would: the reader gets aiohttp's own SocketTimeoutError. aiohttp re-arms
    a timer at every chunk it receives, a timer cancelled and made per event at a model's pace; this one looks at
    the bytes received so far twice per `timeout` (so it ends a stream silent for between one and one and a half
    timeouts), and costs nothing per chunk. What counts is what arrived, not what was read: a run that reads
    slowly (a store retrying) is not the provider's silence."""

    __slots__ = ("_heard_at", "_interval", "_loop", "_received", "_response", "_timeout", "_timer")

    def __init__(self, response: aiohttp.ClientResponse, timeout: float | None) -> None:
        self._response = response
        self._timeout = timeout or 0.0
        self._interval = self._timeout / 2
        self._loop = asyncio.get_running_loop()
        self._heard_at = self._loop.time()
        self._received = response.content.total_bytes
        self._timer: asyncio.TimerHandle | None = None
        connection = response.connection
        if timeout and connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = None  # its timer, armed for the headers, goes at the next chunk
            self._timer = self._loop.call_later(self._interval, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        received = self._response.content.total_bytes
        if received != self._received:
            self._received, self._heard_at = received, now
        if now - self._heard_at < self._timeout:
            self._timer = self._loop.call_later(self._interval, self._check)
            return
        self._timer = None
        self._response.content.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _server_root(base_path: str) -> str:
    """The path of the provider's server root: its API base path without the trailing `/v1` (`/tokenize` of vLLM
    and llama.cpp sits beside `/v1`, not under it)."""
    parts = [part for part in base_path.split("/") if part]
    if parts and parts[-1] == "v1":
        parts.pop()
    return "/" + "".join(f"{part}/" for part in parts)


def _headers(spec: UpstreamSpec, *, accept: str) -> CIMultiDict[str]:
    # The configured extra headers win over ours, as the SDK's `default_headers` did.
    headers = CIMultiDict(
        {
            "Authorization": f"Bearer {spec.api_key or PLACEHOLDER_API_KEY}",
            "Content-Type": "application/json",
            "Accept": accept,
        }
    )
    headers.update(spec.extra_headers)
    return headers


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what follows `[DONE]` for a moment: a body read to its end leaves the connection reusable."""
    with contextlib.suppress(*_TRANSPORT_ERRORS):
        async with asyncio.timeout(DONE_DRAIN_SECONDS):
            while not response.content.is_eof() and await response.content.readany():
                pass


def _let_go(response: aiohttp.ClientResponse) -> None:
    """aiohttp gives the connection back to the pool itself once the body's end has arrived; before that, closing
    drops the connection, which is how the provider learns that nobody is listening any more."""
    response.close()
