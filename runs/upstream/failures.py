"""How a provider's refusals and breakdowns become UpstreamFailures: the one place that decides message, code and
whether to retry. The shapes are those the openai SDK's errors gave when it was the upstream client."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import orjson

from runs.upstream.base import UpstreamFailure

# Statuses worth another attempt (before any output): timeouts, conflicts, rate limits; and every 5xx.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# The SDK's words for a connection that failed or went quiet, kept so failure messages read as before.
CONNECTION_ERROR_MESSAGE = "Connection error."
TIMEOUT_MESSAGE = "Request timed out."
STREAM_ERROR_MESSAGE = "An error occurred during streaming"


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """`retry-after-ms`, or `retry-after` as seconds or an HTTP date (UTC when it names no zone), as the SDK
    reads them; None when absent or unreadable, so the run falls back to its own backoff."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            return _finite_delay(float(millis) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return _finite_delay(float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    try:
        return _finite_delay(email.utils.mktime_tz(parsed) - time.time())
    except (OverflowError, ValueError):
        return None


def _finite_delay(seconds: float) -> float | None:
    # "inf" or "nan" say nothing usable: the SDK ignored them too.
    return max(seconds, 0.0) if math.isfinite(seconds) else None


# Signs that a provider's message describes its own insides: a stack trace, a source file's path.
_INTERNALS = re.compile(
    r"Traceback \(most recent call last\)"
    r"|File \"[^\"]+\", line \d+"
    r"|(?:[A-Za-z]:)?[\\/][\w.\-\\/]+\.(?:py|pyx|rs|go|cpp|cc|c|h|hpp|js|ts|java|rb|gguf|safetensors|bin|onnx|pt)\b"
)
CLIENT_MESSAGE_CHARS = 500
DETAIL_CHARS = 4000


def for_clients(message: str, status: int | None) -> str:
    """A provider's message as a client may see it: kept unless it names the provider's insides (a generic
    sentence instead), and bounded. The full text goes to the gateway's log (`UpstreamFailure.detail`)."""
    # Only the start is searched (the rest is cut off below anyway): the pattern backtracks on long paths.
    if _INTERNALS.search(message[: 2 * CLIENT_MESSAGE_CHARS]):
        kind = "failed" if status is None or status >= 500 else "refused the request"
        return f"The model provider {kind}" + (f" (status {status})." if status is not None else ".")
    return message if len(message) <= CLIENT_MESSAGE_CHARS else message[: CLIENT_MESSAGE_CHARS - 1] + "…"


# A key a proxy echoed back (`Received API key sk-…`, `Bearer …`) is not for the log either.
_SECRETS = re.compile(r"\b(?:sk-[\w-]{8,}|Bearer\s+[\w.\-~+/]{8,}=*)")


def _detail(body: bytes) -> str:
    return _SECRETS.sub("[redacted]", body[:DETAIL_CHARS].decode("utf-8", errors="replace"))


def status_failure(status: int, body: bytes, headers: Mapping[str, str] | None) -> UpstreamFailure:
    """The provider answered a non-2xx status: its message and code when the body carries them, else the SDK's
    `Error code: <status>` (a non-JSON body, such as a proxy's HTML page, is not repeated to the client)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    # The SDK's exception carried `body.get("error", body)` and its message named that object's `message`; the
    # gateway then took `message` and `code` from that object's own `error` when it had one.
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else None
    fallback = f"Error code: {status}"
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        fallback += f" - {error['message']}"
    inner = error.get("error", error) if isinstance(error, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return UpstreamFailure(
        for_clients(message if isinstance(message, str) and message else fallback, status),
        status=status,
        code=code if isinstance(code, str) else None,
        retryable=status in RETRYABLE_STATUSES or status >= 500,
        retry_after_seconds=retry_after_seconds(headers),
        detail=_detail(body),
    )


def connection_failure(upstream: str, error: BaseException) -> UpstreamFailure:
    """The provider could not be reached, or went silent or dropped the connection mid-answer: worth a retry."""
    reason = TIMEOUT_MESSAGE if isinstance(error, asyncio.TimeoutError) else CONNECTION_ERROR_MESSAGE
    return UpstreamFailure(f"upstream {upstream!r} unreachable: {reason}", retryable=True)


def stream_failure(upstream: str, error: object) -> UpstreamFailure:
    """The stream carried `{"error": ...}` (the SDK raised an APIError for any data with a truthy `error`):
    retryable, with the error's message and code when it has them."""
    message = error.get("message") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    said = message if isinstance(message, str) and message else STREAM_ERROR_MESSAGE
    return UpstreamFailure(
        f"upstream {upstream!r} failed: {for_clients(said, None)}",
        code=None if code is None else str(code),
        retryable=True,
        detail=_detail(orjson.dumps(error)) if isinstance(error, (dict, str)) else None,
    )
