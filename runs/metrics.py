"""The runs layer's metrics: runs, events, upstream calls, takeovers, replays, subscribers and webhook deliveries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

from runs.status import TERMINAL
from runs.upstream.base import UpstreamFailure
from storage.base import Store
from storage.metrics import LoopCounter, LoopHistogram, StoreMetrics, measured_store, steps_1_2_5

__all__ = [
    "SUBSCRIBER_DROPS",
    "TAKEOVER_BUCKETS_SECONDS",
    "TAKEOVER_REASONS",
    "TTFT_BUCKETS_SECONDS",
    "WEBHOOK_BUCKETS_SECONDS",
    "WEBHOOK_RESULTS",
    "LoopHistogram",
    "RunMetrics",
    "SubscriberDrop",
    "WebhookResult",
    "steps_1_2_5",
]

# Time to a provider's first token: from a local model's milliseconds to a reasoning model's minute.
TTFT_BUCKETS_SECONDS = (*steps_1_2_5(0.005, 10.0), 30.0, 60.0, 120.0)
# An orphan is found once its lease has expired and a sweep comes round: seconds, more when the store was down.
TAKEOVER_BUCKETS_SECONDS = (*steps_1_2_5(0.1, 10.0), 15.0, 30.0, 60.0, 120.0, 300.0)
WEBHOOK_BUCKETS_SECONDS = (*steps_1_2_5(0.01, 10.0), 30.0, 60.0, 300.0, 3600.0)

WebhookResult = Literal["delivered", "retried", "failed", "given_up"]
WEBHOOK_RESULTS: tuple[WebhookResult, ...] = ("delivered", "retried", "failed", "given_up")
# Why a subscriber stopped getting live events: `lagged` fell a whole buffer behind (its buffer was dropped; it goes
# on from the store), `stalled` stopped reading and was cut off, `disconnected` left before the end,
# `events_lost` was told the store lost events it had seen, `error` broke on a gateway error.
SubscriberDrop = Literal["lagged", "stalled", "disconnected", "events_lost", "error"]
SUBSCRIBER_DROPS: tuple[SubscriberDrop, ...] = ("lagged", "stalled", "disconnected", "events_lost", "error")
TAKEOVER_REASONS = ("lease_expired", "handed_over")


class RunMetrics:
    """Every metric of the runs layer (and the store's, which it hands the store through), on one registry: the
    app's own, so that several gateways in one process (tests) neither collide nor mix their counts. Without a
    registry one of its own is made, which nobody exposes (components built on their own, in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.store = StoreMetrics(registry)
        # Resolved once: the terminal batch looks its status up, other batches miss.
        self._finished = _counters(
            registry,
            "gateway_runs_finished_total",
            "Responses whose terminal event this instance stored, by their final status.",
            status=[status.value for status in TERMINAL],
        )
        self._runs_queued = Counter(
            "gateway_runs_queued_total",
            "Responses this instance admitted into the store's queue (it was at capacity); any instance starts them.",
            registry=registry,
        )
        self._events_appended = LoopCounter(  # counted per batch: at light load, per event
            "gateway_events_appended_total",
            "Events this instance stored (admission's first events and every run's batches).",
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "gateway_idempotent_replays_total",
            "Creates whose Idempotency-Key named a response already made: it was served instead of a new one.",
            registry=registry,
        )
        self._upstream_requests = Counter(
            "gateway_upstream_requests_total",
            "Calls to a provider for a model turn, retries included.",
            ["upstream"],
            registry=registry,
        )
        self._upstream_retries = Counter(
            "gateway_upstream_retries_total",
            "Provider calls made again after a retryable failure before any output.",
            ["upstream"],
            registry=registry,
        )
        self._upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Provider calls that failed, by the provider's HTTP status ('none': the connection failed or timed "
            "out, or the stream broke or carried an error).",
            ["upstream", "status"],
            registry=registry,
        )
        self._upstream_ttft = Histogram(
            "gateway_upstream_ttft_seconds",
            "From a provider call being sent to its first output event (not its lifecycle events).",
            ["upstream"],
            buckets=TTFT_BUCKETS_SECONDS,
            registry=registry,
        )
        self._takeovers = _counters(
            registry,
            "gateway_takeovers_total",
            "Responses this instance claimed from an owner whose lease expired (lease_expired) or who handed them "
            "over at shutdown (handed_over), and then ran again or ended.",
            reason=TAKEOVER_REASONS,
        )
        self._takeover_latency = Histogram(
            "gateway_takeover_seconds",
            "From the previous owner's lease expiry (stored, in the store's clock) to this instance having claimed "
            "the response and restarted or ended it (this host's clock). Handed-over responses are not observed.",
            buckets=TAKEOVER_BUCKETS_SECONDS,
            registry=registry,
        )
        self._subscribers_dropped = _counters(
            registry,
            "gateway_subscribers_dropped_total",
            "Live event subscribers that stopped getting events before the response ended, by reason.",
            reason=SUBSCRIBER_DROPS,
        )
        self._webhook_deliveries = _counters(
            registry,
            "gateway_webhook_deliveries_total",
            "Webhook delivery attempts by result: delivered, retried (failed, will be tried again), failed (failed, "
            "not retryable), given_up (failed after the retry budget ran out).",
            result=WEBHOOK_RESULTS,
        )
        self._webhook_latency = Histogram(
            "gateway_webhook_delivery_seconds",
            "From a webhook's terminal event being stored to its delivery being acknowledged by the receiver.",
            buckets=WEBHOOK_BUCKETS_SECONDS,
            registry=registry,
        )

    def measure(self, store: Store) -> Store:
        """The store, its operations timed (see storage/metrics.py)."""
        return measured_store(store, self.store)

    def admitted(self, events: int, *, queued: bool) -> None:
        """Admission stored a response with its first `events`, owned here or (`queued`) in the queue."""
        self._events_appended.inc(events)
        if queued:
            self._runs_queued.inc()

    def stored(self, events: int, status: str) -> None:
        """A batch of `events` was stored, leaving the response `status`: one call per batch, never per event."""
        self._events_appended.inc(events)
        finished = self._finished.get(status)
        if finished is not None:
            finished.inc()

    def upstream_called(self, upstream: str, *, retry: bool) -> None:
        self._upstream_requests.labels(upstream).inc()
        if retry:
            self._upstream_retries.labels(upstream).inc()

    def upstream_failed(self, upstream: str, failure: UpstreamFailure) -> None:
        status = "none" if failure.status is None else str(failure.status)
        self._upstream_errors.labels(upstream, status).inc()

    def upstream_first_output(self, upstream: str, seconds: float) -> None:
        self._upstream_ttft.labels(upstream).observe(seconds)

    def taken_over(self, lease_until_ms: int) -> None:
        """This instance claimed a response from another owner and restarted or ended it; `lease_until_ms` is the
        old lease's stored expiry (0: released, i.e. handed over)."""
        if lease_until_ms <= 0:
            self._takeovers["handed_over"].inc()
            return
        self._takeovers["lease_expired"].inc()
        self._takeover_latency.observe(max(time.time() - lease_until_ms / 1000, 0.0))

    def subscriber_dropped(self, reason: SubscriberDrop) -> None:
        self._subscribers_dropped[reason].inc()

    def webhook_delivery(self, result: WebhookResult, seconds: float | None = None) -> None:
        """Record one delivery attempt's `result`; `seconds` (for a delivered one) from the terminal event being
        stored to the receiver's acknowledgement."""
        self._webhook_deliveries[result].inc()
        if seconds is not None:
            self._webhook_latency.observe(seconds)


def _counters(registry: CollectorRegistry, name: str, documentation: str, **label: Sequence[str]) -> dict[str, Counter]:
    """A counter with one label whose values are known: each value's child made once (and shown as 0 from the
    start), so counting is a dict lookup, not a label resolution."""
    ((label_name, values),) = label.items()
    counter = Counter(name, documentation, [label_name], registry=registry)
    return {value: counter.labels(value) for value in values}
