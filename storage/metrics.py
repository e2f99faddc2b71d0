"""The store's metrics: how long each operation's round trip takes, and which ones failed to reach the store."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram

from storage.base import Store, StoreClosed, StoreError, StoreUnavailable


def steps_1_2_5(low: float, high: float) -> tuple[float, ...]:
    """Histogram bounds 1, 2.5 and 5 times each power of ten, from `low` to `high`."""
    first, last = math.floor(math.log10(low)), math.floor(math.log10(high))
    bounds = (round(10.0**power * step, 12) for power in range(first, last + 1) for step in (1, 2.5, 5))
    return tuple(bound for bound in bounds if low <= bound <= high)


# From a pipelined append (sub-millisecond) to a Redis that is about to time out (10 s).
STORE_LATENCY_BUCKETS_SECONDS = steps_1_2_5(0.0001, 10.0)


class StoreMetrics:
    """`gateway_store_operation_seconds{operation}` and `gateway_store_errors_total{operation,error}`, on one
    registry. `operation` is a Store method's name (the protocol's domain words), so its values are bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "gateway_store_operation_seconds",
            "Round trip of one store operation, as its caller waited for it (failed ones included).",
            ["operation"],
            buckets=STORE_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.errors = Counter(
            "gateway_store_errors_total",
            "Store operations that did not get an answer: unavailable (unreachable, timed out), closed (shutting "
            "down), or unexpected (any other exception). Domain refusals (lease lost, missing) are answers.",
            ["operation", "error"],
            registry=registry,
        )


class _MeasuredStore:
    """A store whose coroutine methods are timed. Everything else (feeds, notices, attributes) is the store's own.
    Each method is wrapped once, on first use, and its label children resolved then: a call costs two clock reads
    and one observation, no allocation beyond its coroutine."""

    def __init__(self, inner: Store, metrics: StoreMetrics) -> None:
        self.inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(target):
            return target
        measured = _timed(target, name, self._metrics)
        setattr(self, name, measured)  # found directly from now on; __getattr__ is not asked again
        return measured


def _timed(
    method: Callable[..., Coroutine[Any, Any, Any]], operation: str, metrics: StoreMetrics
) -> Callable[..., Coroutine[Any, Any, Any]]:
    latency = metrics.latency.labels(operation)
    unavailable = metrics.errors.labels(operation, "unavailable")
    closed = metrics.errors.labels(operation, "closed")
    unexpected = metrics.errors.labels(operation, "unexpected")
    clock = time.perf_counter

    async def call(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return await method(*args, **kwargs)
        except StoreClosed:
            closed.inc()
            raise
        except StoreUnavailable:
            unavailable.inc()
            raise
        except StoreError:
            raise
        except Exception:
            unexpected.inc()
            raise
        finally:
            latency.observe(clock() - started)

    return call


def measured_store(store: Store, metrics: StoreMetrics) -> Store:
    """`store`, with the latency and failures of its operations recorded in `metrics`. The backend itself is
    `.inner` (for tests that look at it)."""
    return cast(Store, _MeasuredStore(store, metrics))
