"""Prometheus metrics of one gateway app: its registry, the HTTP layer's own metrics, and `/metrics` (on the main
port or a port of its own)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.auth import PUBLIC_PATHS
from gateway.config import MetricsConfig
from gateway.gc_pacing import FIRST_OUTPUT_WRITTEN
from gateway.outcome import Outcome, answered
from gateway.state import LIVE_EVENTS, RUN_MANAGER, SETTINGS
from runs.metrics import TTFT_BUCKETS_SECONDS, LoopHistogram, RunMetrics, SubscriberDrop, steps_1_2_5
from runs.snapshot import has_output
from runs.store import StoredEvent

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# nginx's code for a request whose client closed the connection before it was answered.
CLIENT_CLOSED_REQUEST = 499
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Streams last as long as their response: minutes for a long generation.
REQUEST_BUCKETS_SECONDS = (*steps_1_2_5(0.001, 10.0), 30.0, 60.0, 120.0, 300.0, 600.0)
INTER_EVENT_BUCKETS_SECONDS = steps_1_2_5(0.0005, 10.0)


class GatewayMetrics:
    """Every metric of one gateway app, on a registry of its own.

    Why a registry per app, not prometheus-client's global one: a process may run several gateway apps (the tests
    do), and each must count only its own requests and runs, and report only its own runs and subscribers as
    "this instance". With the global registry every app would register the same names (a duplicate-registration
    error at the second app) and its gauges would need unregistering at cleanup; a registry per app is made and
    dropped with the app, and `/metrics` exposes exactly it. The process-wide collectors (CPU, memory, GC) are
    registered in each app's registry too: they read the process, not global state of ours."""

    def __init__(self, config: MetricsConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = RunMetrics(self.registry)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self._requests = Counter(
            "gateway_http_requests_total",
            "HTTP requests answered, by route template, method and status (499: the client left first).",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "gateway_http_request_duration_seconds",
            "From a request's arrival to the end of its answer (for a stream or a WebSocket, its whole life).",
            ["route", "method"],
            buckets=REQUEST_BUCKETS_SECONDS,
            registry=self.registry,
        )
        # Observed per client write (at light load, per event): the loop's own lock-free kind.
        self.ttft = LoopHistogram(
            "gateway_ttft_seconds",
            "Time to first token as the gateway serves it: from a streamed create's arrival to its first output "
            "event written to the client (the provider's own part is gateway_upstream_ttft_seconds).",
            buckets=TTFT_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.inter_event = LoopHistogram(
            "gateway_inter_event_seconds",
            "Between two writes of events to one client stream, from its first output event on (a write carries "
            "every event at hand).",
            buckets=INTER_EVENT_BUCKETS_SECONDS,
            registry=self.registry,
        )
        # Set once /metrics listens on a port of its own (0 in the config picks a free one).
        self.port: int | None = None

    @property
    def on_main_port(self) -> bool:
        return self.config.enabled and self.config.port is None

    def public_paths(self) -> frozenset[str]:
        """The paths the main port serves without an API key."""
        if self.on_main_port and not self.config.require_auth:
            return PUBLIC_PATHS | {METRICS_PATH}
        return PUBLIC_PATHS

    def watch(self, app: web.Application) -> None:
        """Report `app`'s runs and subscribers as this instance's, and serve `/metrics` on its port or its own."""
        self.registry.register(_ThisInstance(app))
        if self.on_main_port:
            app.router.add_get(METRICS_PATH, self._expose)
        elif self.config.enabled:
            app.cleanup_ctx.append(self._serve_on_own_port)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts and times every request under its route's template (never its raw path: bounded labels)."""
        started = time.perf_counter()
        request[REQUEST_ARRIVED] = started
        outcome = Outcome()
        try:
            return await answered(request, handler, outcome)
        finally:
            status = CLIENT_CLOSED_REQUEST if outcome.client_left else outcome.status
            resource = request.match_info.route.resource
            route = UNMATCHED_ROUTE if resource is None else resource.canonical
            method = request.method if request.method in _METHODS else "other"
            self._requests.labels(route, method, str(status)).inc()
            self._duration.labels(route, method).observe(time.perf_counter() - started)

    async def _expose(self, request: web.Request) -> web.Response:
        return exposition(self.registry, request)

    async def _serve_on_own_port(self, app: web.Application) -> AsyncIterator[None]:
        server = web.Application()

        async def expose(request: web.Request) -> web.Response:
            return exposition(self.registry, request)

        server.router.add_get(METRICS_PATH, expose)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        host = self.config.host or app[SETTINGS].server.host
        await web.TCPSite(runner, host, self.config.port).start()
        self.port = runner.addresses[0][1]
        log.info("metrics: http://%s:%d%s", host, self.port, METRICS_PATH)
        yield
        await runner.cleanup()


REQUEST_ARRIVED = web.RequestKey("request_arrived", float)
METRICS = web.AppKey("metrics", GatewayMetrics)


def exposition(registry: CollectorRegistry, request: web.Request) -> web.Response:
    """The registry in the format the scraper asks for (Prometheus text, or OpenMetrics)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


class StreamClock:
    """Times one client stream: its first output event (from the request's arrival, for a create) and the gaps
    between its writes after that. One clock read and at most one observation per write, never per event. A clock
    of an app without metrics (a bare app in a test) records nothing. A create's clock also says when its first
    output has been written (`first_output_written`, see gateway/gc_pacing.py)."""

    __slots__ = ("_arrived", "_first_output_written", "_gaps", "_last", "_metrics")

    def __init__(
        self,
        metrics: GatewayMetrics | None,
        arrived: float | None,
        first_output_written: Callable[[], None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._arrived = arrived
        self._first_output_written = first_output_written
        self._last: float | None = None
        # The histogram's child itself: observed at every write.
        self._gaps = None if metrics is None else metrics.inter_event.labels()

    def written(self, batch: Sequence[StoredEvent]) -> None:
        """`batch` has just been written to the client."""
        if self._last is not None:  # after the first output: one gap per write
            now = time.perf_counter()
            if self._gaps is not None:
                self._gaps.observe(now - self._last)
            self._last = now
        elif has_output(batch):
            self._last = now = time.perf_counter()
            if self._first_output_written is not None:
                self._first_output_written()
                self._first_output_written = None
            if self._metrics is not None and self._arrived is not None:
                self._metrics.ttft.observe(now - self._arrived)

    def dropped(self, reason: SubscriberDrop) -> None:
        """The stream ended before its terminal event was written, for `reason`."""
        if self._metrics is not None:
            self._metrics.runs.subscriber_dropped(reason)


def stream_clock(request: web.Request) -> StreamClock:
    """The clock of one event stream to a client; a create's stream (POST) also times its first token."""
    metrics = request.app.get(METRICS)
    if request.method != "POST":
        return StreamClock(metrics, None)
    return StreamClock(metrics, request.get(REQUEST_ARRIVED), request.get(FIRST_OUTPUT_WRITTEN))


class _ThisInstance(Collector):
    """Gauges read from the app at scrape time: what this instance holds now, at no cost between scrapes."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        manager = self._app.get(RUN_MANAGER)
        live = self._app.get(LIVE_EVENTS)
        yield GaugeMetricFamily(
            "gateway_runs_in_progress",
            "Runs this instance is executing now.",
            value=0 if manager is None else manager.active_count,
        )
        yield GaugeMetricFamily(
            "gateway_subscribers",
            "Live event subscribers connected to this instance (streams, and synchronous requests waiting).",
            value=0 if live is None else live.subscriber_count,
        )
