"""Tracing (OpenTelemetry): the app's own tracer provider, and a server span per HTTP request."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import TracingConfig
from gateway.state import SETTINGS, TRACER

INSTRUMENTATION_NAME = "responses-gateway"
DEFAULT_SERVICE_NAME = "responses-gateway"

_PROPAGATOR = TraceContextTextMapPropagator()


def build_tracer_provider(config: TracingConfig) -> TracerProvider:
    """A provider exporting over OTLP/HTTP in batches, off the event loop (the SDK's exporter thread)."""
    name = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}),
        # A caller's sampled (or not) `traceparent` decides for its own trace; the ratio for traces started here.
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    # endpoint=None: the exporter reads the standard OTEL_EXPORTER_OTLP_* variables (headers, timeout, …).
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return provider


def tracing_ctx(given: TracerProvider | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's tracer, from `given` or else a provider built from the `tracing` settings. Placed first in
    cleanup_ctx, so runs end (and their spans with them) before it closes. A provider the app built is shut
    down with it (its last spans exported); a given one belongs to its maker, and is only flushed."""

    async def tracing(app: web.Application) -> AsyncIterator[None]:
        provider = given if given is not None else build_tracer_provider(app[SETTINGS].tracing)
        app[TRACER] = provider.get_tracer(INSTRUMENTATION_NAME)
        yield
        # Both block on the exporter: off the event loop, whose other apps may still be serving.
        if given is None:
            await asyncio.to_thread(provider.shutdown)
        else:
            await asyncio.to_thread(provider.force_flush)

    return tracing


@web.middleware
async def trace_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span around the request (the outermost middleware: it sees the status clients get), continuing
    the caller's trace when it sent a W3C `traceparent`. Runs admitted by the request are children of it."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    attributes: dict[str, str | int] = {
        "http.request.method": request.method,
        "url.path": request.path,
        "url.scheme": request.scheme,
    }
    if route is not None:
        attributes["http.route"] = route
    span = request.app[TRACER].start_span(
        f"{request.method} {route}" if route is not None else request.method,
        context=_PROPAGATOR.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )
    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        try:
            response = await handler(request)
        except web.HTTPException as error:
            _set_status(span, error.status)
            raise
        except Exception as error:  # an error the error middleware did not turn into a response
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(StatusCode.ERROR)
            raise
        _set_status(span, response.status)
        return response


def _set_status(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:  # a client's 4xx is not the server's error (HTTP conventions)
        span.set_attribute("error.type", str(status))
        span.set_status(StatusCode.ERROR)
