"""Retrying a provider call, but only while nothing of the answer has been emitted."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator
from typing import Any

from runs.metrics import RunMetrics
from runs.upstream.base import CallTrace, Upstream, UpstreamFailure

log = logging.getLogger(__name__)

# Lifecycle events announce a response but carry none of its output; a retry after them is invisible.
_NOT_OUTPUT = frozenset({"response.created", "response.queued", "response.in_progress"})
MAX_BACKOFF_SECONDS = 8.0
MAX_RETRY_AFTER_SECONDS = 60.0


def backoff_seconds(attempt: int, base: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, base * 2^attempt], capped."""
    return random.uniform(0, min(base * 2**attempt, MAX_BACKOFF_SECONDS))


async def stream_with_retries(
    upstream: Upstream,
    body: dict[str, Any],
    api_key: str | None = None,
    call: CallTrace | None = None,
    metrics: RunMetrics | None = None,
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The upstream's events, in the lists they arrived in. A retryable failure (connection error, 408, 409,
    429, 5xx, a stream cut short) before the first output event is retried up to `max_retries` times, honouring
    the provider's Retry-After; once output has been emitted a failure is final: re-running the model would bill
    twice and change the text. `call` (started and ended by its caller) hears of each retry; each call, its
    failure and its time to first output go to `metrics`."""
    spec = upstream.spec
    attempt = 0
    while True:
        emitted_output = False
        if metrics is not None:
            metrics.upstream_called(spec.name, retry=attempt > 0)
        sent = time.perf_counter()
        try:
            async for events in upstream.stream_turn(body, api_key=api_key, call=call):
                if not emitted_output and any(event.get("type") not in _NOT_OUTPUT for event in events):
                    emitted_output = True
                    if metrics is not None:
                        metrics.upstream_first_output(spec.name, time.perf_counter() - sent)
                yield events
            return
        except UpstreamFailure as failure:
            if metrics is not None:
                metrics.upstream_failed(spec.name, failure)
            if emitted_output or not failure.retryable or attempt >= spec.max_retries:
                raise
            delay = failure.retry_after_seconds
            if delay is None:
                delay = backoff_seconds(attempt, spec.retry_backoff_seconds)
            delay = min(delay, MAX_RETRY_AFTER_SECONDS)
            attempt += 1
            log.warning(
                "upstream %s failed before any output (%s); retry %d/%d in %.2fs",
                spec.name,
                failure.message,
                attempt,
                spec.max_retries,
                delay,
            )
            if call is not None:
                call.retrying(failure)
            await asyncio.sleep(delay)
