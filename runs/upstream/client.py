"""The HTTP client every adapter uses (the openai SDK's), and how its errors become UpstreamFailures."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncGenerator
from typing import Any

import openai
from openai import AsyncOpenAI, AsyncStream

from runs.upstream.base import UpstreamFailure, UpstreamSpec

# The SDK refuses to start without a key; local providers (vLLM, llama.cpp, Ollama) ignore it.
PLACEHOLDER_API_KEY = "not-needed"
# Statuses worth another attempt (before any output): timeouts, rate limits, server errors.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def make_client(spec: UpstreamSpec) -> AsyncOpenAI:
    """An SDK client for the provider. Its own retries are off: the run retries, and only before any output."""
    return AsyncOpenAI(
        base_url=spec.base_url,
        api_key=spec.api_key or PLACEHOLDER_API_KEY,
        max_retries=0,
        timeout=openai.Timeout(spec.read_timeout_seconds, connect=spec.connect_timeout_seconds),
        default_headers=spec.extra_headers or None,
    )


def _retry_after_seconds(headers: Any) -> float | None:
    """`retry-after-ms`, or `retry-after` as seconds or an HTTP date, as the SDK itself reads them."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(parsed.timestamp() - time.time(), 0.0)


def _error_body(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def failure_from(error: openai.APIError, upstream: str) -> UpstreamFailure:
    """The UpstreamFailure for an SDK error: the provider's status, code and message, and whether to retry."""
    if isinstance(error, openai.APIStatusError):
        inner = _error_body(error)
        message = inner.get("message") if isinstance(inner.get("message"), str) else None
        code = inner.get("code") if isinstance(inner.get("code"), str) else None
        status = error.status_code
        return UpstreamFailure(
            message or error.message,
            status=status,
            code=code,
            retryable=status in RETRYABLE_STATUSES or status >= 500,
            retry_after_seconds=_retry_after_seconds(error.response.headers),
        )
    if isinstance(error, openai.APIConnectionError):  # includes timeouts
        return UpstreamFailure(f"upstream {upstream!r} unreachable: {error.message}", retryable=True)
    message = error.message or "upstream error"
    return UpstreamFailure(
        f"upstream {upstream!r} failed: {message}", code=getattr(error, "code", None), retryable=True
    )


async def stream_json(
    client: AsyncOpenAI, upstream: str, path: str, body: dict[str, Any], api_key: str | None = None
) -> AsyncGenerator[dict[str, Any], None]:
    """POST `body` to `path` and yield each streamed JSON object as a plain dict. Plain dicts rather than SDK
    models: the run only re-numbers and stores events, so parsing each into a model would be wasted work.
    `api_key` (a client's own key, for pass-through upstreams) replaces the configured one for this call."""
    options: Any = {"headers": {"Authorization": f"Bearer {api_key}"}} if api_key else {}
    try:
        stream = await client.post(
            path, body=body, cast_to=object, stream=True, stream_cls=AsyncStream[object], options=options
        )
    except openai.APIError as error:
        raise failure_from(error, upstream) from error
    try:
        async for item in stream:
            if isinstance(item, dict):
                yield item
    except openai.APIError as error:
        raise failure_from(error, upstream) from error
    finally:
        await stream.close()


async def provider_models(client: AsyncOpenAI, upstream: str) -> list[str]:
    """The model ids the provider lists at `GET /models`."""
    try:
        page = await client.get("/models", cast_to=object)
    except openai.APIError as error:
        raise failure_from(error, upstream) from error
    data = page.get("data") if isinstance(page, dict) else None
    return [str(entry["id"]) for entry in data or [] if isinstance(entry, dict) and "id" in entry]
