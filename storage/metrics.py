"""The store's metrics (how long each operation's round trip takes, and which ones failed to reach the store), and
the lock-free histogram and counter that every layer's per-event metrics use (this is the lowest layer)."""

from __future__ import annotations

import bisect
import inspect
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from storage.base import Lease, Store, StoreClosed, StoredEvent, StoreError, StoreUnavailable


def steps_1_2_5(low: float, high: float) -> tuple[float, ...]:
    """Histogram bounds 1, 2.5 and 5 times each power of ten, from `low` to `high`."""
    first, last = math.floor(math.log10(low)), math.floor(math.log10(high))
    bounds = (round(10.0**power * step, 12) for power in range(first, last + 1) for step in (1, 2.5, 5))
    return tuple(bound for bound in bounds if low <= bound <= high)


class LoopHistogram(Collector):
    """A histogram for the event loop's hot path: observed only from the loop's thread, so an observation is a
    bisect and two additions, with no lock. prometheus-client's Histogram takes a lock per bucket and per sum on
    every observation (two lock round trips and a validity check, about 1.5 µs); the gateway observes a few per
    event, which was a measurable share of an event's CPU. Exposed like prometheus-client's own (`_bucket` with
    cumulative `le`, `_count`, `_sum`), read at scrape time (on the same loop, so never mid-observation).

    Label values are resolved once with `labels(...)`, which returns a child whose `observe` is the cheap path."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = (*sorted(float(bound) for bound in buckets if bound != math.inf), math.inf)
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        if not self._labelnames:
            self._unlabelled = self.labels()
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopHistogramChild(self._bounds)
        return child

    def observe(self, amount: float) -> None:
        """For a histogram without labels."""
        self._unlabelled.observe(amount)

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in self._children.items():
            cumulative = 0
            buckets = []
            for bound, count in zip(self._bounds, child.counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class LoopHistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets count what is less than or equal to their `le`.
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (prometheus-client's own format: `+Inf`, `0.005`, `1.0`)."""
    return "+Inf" if bound == math.inf else repr(bound)


class LoopCounter(Collector):
    """A counter without labels for the event loop's hot path, like LoopHistogram: a plain addition, no lock."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        # Named as prometheus-client names counters: the family without `_total`, its sample with it.
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self.value = 0
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self.value)


# From a pipelined append (sub-millisecond) to a Redis that is about to time out (10 s).
STORE_LATENCY_BUCKETS_SECONDS = steps_1_2_5(0.0001, 10.0)


class StoreMetrics:
    """`gateway_store_operation_seconds{operation}` and `gateway_store_errors_total{operation,error}`, on one
    registry. `operation` is a Store method's name (the protocol's domain words), so its values are bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = LoopHistogram(
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
        self._appends = _Operation("append_events", metrics)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(target):
            return target
        measured = _timed(target, _Operation(name, self._metrics))
        setattr(self, name, measured)  # found directly from now on; __getattr__ is not asked again
        return measured

    def start_append(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        lease: Lease,
        done: Callable[[Exception | None], None],
    ) -> bool:
        """Timed as the `append_events` it stands for, from now until `done`."""
        operation = self._appends
        started = operation.clock()

        def measured(error: Exception | None) -> None:
            try:
                operation.ended(started, error)
            finally:
                done(error)  # whatever the metric does: the append's caller must hear of its end

        return self.inner.start_append(response_id, events, lease=lease, done=measured)


class _Operation:
    """One operation's latency child and failure counters, resolved once."""

    __slots__ = ("closed", "latency", "unavailable", "unexpected")

    clock = staticmethod(time.perf_counter)

    def __init__(self, name: str, metrics: StoreMetrics) -> None:
        self.latency = metrics.latency.labels(name)
        self.unavailable = metrics.errors.labels(name, "unavailable")
        self.closed = metrics.errors.labels(name, "closed")
        self.unexpected = metrics.errors.labels(name, "unexpected")

    def ended(self, started: float, error: BaseException | None) -> None:
        self.latency.observe(self.clock() - started)
        if error is None or not isinstance(error, Exception):
            return
        if isinstance(error, StoreClosed):
            self.closed.inc()
        elif isinstance(error, StoreUnavailable):
            self.unavailable.inc()
        elif not isinstance(error, StoreError):  # a domain refusal (lease lost, missing) is an answer
            self.unexpected.inc()


def _timed(
    method: Callable[..., Coroutine[Any, Any, Any]], operation: _Operation
) -> Callable[..., Coroutine[Any, Any, Any]]:
    clock = operation.clock

    async def call(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            result = await method(*args, **kwargs)
        except BaseException as error:
            operation.ended(started, error)
            raise
        operation.ended(started, None)
        return result

    return call


def measured_store(store: Store, metrics: StoreMetrics) -> Store:
    """`store`, with the latency and failures of its operations recorded in `metrics`. The backend itself is
    `.inner` (for tests that look at it)."""
    return cast(Store, _MeasuredStore(store, metrics))
