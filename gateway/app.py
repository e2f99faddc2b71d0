"""The application factory: state, resources (store, upstreams, run manager) and routes of one gateway."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from gateway import gc_pacing
from gateway.access_log import access_log_middleware, note_sent_status
from gateway.auth import Authenticator, auth_middleware
from gateway.config import Settings, WebhooksConfig
from gateway.errors import MAX_BODY_BYTES, error_middleware
from gateway.metrics import METRICS, GatewayMetrics
from gateway.request_id import request_id_middleware, send_request_id
from gateway.routes import compaction, conversations, health, input_tokens, models, responses, steering
from gateway.socket_counts import SOCKET_COUNTS, SocketCounts
from gateway.state import (
    FAULTS,
    LIVE_EVENTS,
    OWNERSHIP,
    ROUTER,
    RUN_MANAGER,
    SETTINGS,
    STORE,
    TRACER,
    WEBHOOK_SETTINGS,
)
from gateway.tracing import trace_requests, tracing_ctx
from runs.faults import FaultPoints
from runs.history import HistoryBounds
from runs.lifecycle import Lifecycle, RunSettings
from runs.live import LiveEvents
from runs.manager import RunManager
from runs.ownership import Ownership
from runs.store import check_reachable, open_store
from runs.tracing import RunTracer
from runs.upstream.base import UpstreamSpec
from runs.upstream.router import UpstreamRouter
from runs.webhooks import WebhookEndpoint, WebhookSender, WebhookSettings
from simulator import SimulatorSettings, create_simulator_app

log = logging.getLogger("gateway")

SIMULATOR_UPSTREAM = "simulator"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# How long start-up waits for the store to answer before saying it does not (it starts either way).
STARTUP_PING_SECONDS = 2.0


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    storage = app[SETTINGS].storage
    store = open_store(
        storage.url,
        key_prefix=storage.key_prefix,
        retention_seconds=storage.retention_seconds,
        max_connections=storage.max_connections,
        replica_acks=storage.replica_acks,
        replica_ack_timeout_ms=storage.replica_ack_timeout_ms,
    )
    faults = app.get(FAULTS)
    store = app[METRICS].runs.measure(store)
    if faults is not None and faults.wrap_store is not None:
        store = faults.wrap_store(store)
    if storage.url.startswith("memory://"):
        log.info("storage: embedded in-process store (memory://); responses live as long as this process")
    else:
        log.info("storage: %s (key prefix %r)", storage.url.split("@")[-1], storage.key_prefix)
        # Not fatal: Redis may come up after the gateway (one compose up), and an outage later is served the same
        # way; but a wrong URL is said once, here, in words.
        try:
            await check_reachable(store, timeout_seconds=STARTUP_PING_SECONDS)
        except Exception as error:
            log.warning(
                "storage: %s does not answer (%s); serving anyway: /readyz answers 503 and requests get 503 until "
                "it does",
                storage.url.split("@")[-1],
                error or type(error).__name__,
            )
    app[STORE] = store
    yield
    await store.close()


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    specs = [upstream.to_spec() for upstream in settings.upstreams]
    simulator: web.AppRunner | None = None
    if not specs:
        # The built-in model is a real HTTP server on loopback, reached through the same adapter as any
        # provider, so a zero-config gateway exercises the whole path.
        sim = settings.simulator
        simulator = web.AppRunner(
            create_simulator_app(SimulatorSettings(sim.tokens, sim.token_delay_ms, sim.ttft_ms)),
            access_log=None,
        )
        await simulator.setup()
        site = web.TCPSite(simulator, "127.0.0.1", 0)
        await site.start()
        port = simulator.addresses[0][1]
        specs = [UpstreamSpec(name=SIMULATOR_UPSTREAM, kind="responses", base_url=f"http://127.0.0.1:{port}/v1")]
        log.info("model: no upstream configured; serving the built-in simulated model (any model name)")
    else:
        for spec in specs:
            log.info("upstream %s (%s) at %s for models %s", spec.name, spec.kind, spec.base_url, list(spec.models))
    router = UpstreamRouter.from_specs(specs)
    app[ROUTER] = router
    yield
    await router.close()
    if simulator is not None:
        await simulator.cleanup()


async def _live_events_ctx(app: web.Application) -> AsyncIterator[None]:
    live = LiveEvents(
        app[STORE].open_event_feed(),
        buffer_events=app[SETTINGS].sse.subscriber_buffer_events,
        metrics=app[METRICS].runs,
    )
    live.start()
    app[LIVE_EVENTS] = live
    yield
    await live.close()


async def _runs_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    runs = settings.runs
    run_settings = RunSettings(
        max_concurrent=runs.max_concurrent,
        lease_ms=int(runs.lease_seconds * 1000),
        renew_seconds=runs.renew_seconds,
        sweep_seconds=runs.sweep_seconds,
        handover=not settings.storage.url.startswith("memory://"),
        idempotency_ttl_seconds=settings.idempotency.ttl_seconds,
        tenant_run_limits=tenant_run_limits(settings),
        history_bounds=HistoryBounds(
            max_bytes=settings.limits.max_history_bytes,
            max_items=settings.limits.max_history_items,
            max_chain_length=settings.limits.max_chain_length,
        ),
    )
    webhook_settings = app[WEBHOOK_SETTINGS]
    webhooks = WebhookSender(app[STORE], webhook_settings, app[METRICS].runs) if webhook_settings.endpoints else None
    lifecycle = Lifecycle(
        app[STORE],
        run_settings,
        app.get(FAULTS) or FaultPoints.from_environment(),
        publisher=app[LIVE_EVENTS],
        webhooks=webhooks,
        metrics=app[METRICS].runs,
    )
    tracer = app.get(TRACER)
    run_tracer = RunTracer(tracer) if tracer is not None else None
    manager = RunManager(app[STORE], app[ROUTER], run_settings, lifecycle=lifecycle, tracer=run_tracer)
    manager.start()
    ownership = Ownership(manager, app[STORE])
    ownership.start()
    app[RUN_MANAGER] = manager
    app[OWNERSHIP] = ownership
    if webhooks is not None:
        webhooks.start()
        names = ", ".join(endpoint.name for endpoint in app[WEBHOOK_SETTINGS].endpoints)
        log.info("webhooks: background responses that end are announced to %s", names)
    log.info("instance %s: up to %d concurrent runs", run_settings.instance_id, run_settings.max_concurrent)
    yield
    try:
        await ownership.close()
        await manager.close()
    finally:
        # Last: runs ended while closing owe theirs too. What is still owed stays in a shared store's outbox
        # for the other instances (the embedded store's ends with the process).
        if webhooks is not None:
            await webhooks.close()


async def drain(app: web.Application, hurry: asyncio.Event | None = None) -> None:
    """Graceful shutdown, before the server stops listening: /readyz turns 503 and new runs are refused while the
    running ones get `shutdown.grace_seconds` (cut short when `hurry` is set); what is left is handed over; then
    event streams end cleanly (their clients reconnect elsewhere with their cursor). With the embedded store there
    is nobody to hand over to: what is left is ended here, and its streams get the terminal event first."""
    manager = app[RUN_MANAGER]
    draining = asyncio.ensure_future(manager.drain(app[SETTINGS].shutdown.grace_seconds))
    if hurry is not None:
        hurried = asyncio.ensure_future(hurry.wait())
        await asyncio.wait({draining, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not draining.done():
            # Almost always caught waiting out the grace period; if it was caught handing over, doing that again
            # finds the leases already released.
            draining.cancel()
            await asyncio.wait({draining})
            draining = asyncio.ensure_future(manager.drain(0))
    await draining
    if manager.settings.handover:
        await app[LIVE_EVENTS].close()
    else:
        # Streams stay open to send the terminal event; the server's shutdown waits for them (bounded by its
        # shutdown_timeout) before the live events close.
        await manager.close()


def tenant_run_limits(settings: Settings) -> dict[str, int]:
    """Each limited tenant's runs at once, for queued runs (which start without their key): the most any of its
    keys allows; a tenant with an unlimited key has no limit."""
    limits: dict[str, int | None] = {}
    for key in settings.auth.keys if settings.auth.enabled else []:
        known = limits.get(key.tenant, 0)
        limit = key.max_concurrent_runs
        limits[key.tenant] = None if known is None or limit is None else max(known, limit)
    return {tenant: limit for tenant, limit in limits.items() if limit is not None}


def webhook_settings(config: WebhooksConfig, retention_seconds: int) -> WebhookSettings:
    """The sender's settings, with each endpoint's secret read from its environment variable (ConfigError if
    unset). A delivery is given up by the store's retention at the latest: the outbox, like every key, expires
    with it."""
    endpoints = tuple(
        WebhookEndpoint(
            name=endpoint.name,
            url=endpoint.url,
            secret=endpoint.secret(),
            events=frozenset(endpoint.events),
            tenants=frozenset(endpoint.tenants),
        )
        for endpoint in config.endpoints
    )
    return WebhookSettings(
        endpoints=endpoints,
        poll_seconds=config.poll_seconds,
        timeout_seconds=config.timeout_seconds,
        first_retry_seconds=config.first_retry_seconds,
        max_retry_seconds=config.max_retry_seconds,
        give_up_after_seconds=min(config.give_up_after_seconds, retention_seconds),
        max_in_flight=config.max_in_flight,
    )


def create_app(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> web.Application:
    """A gateway application. Resources are opened on startup and closed on cleanup, in dependency order. With
    `tracing.enabled`, spans go to `tracer_provider` if given (tests give an in-memory one), else to one built
    from the settings; with tracing off nothing is traced, whatever is given."""
    authenticator = Authenticator(settings.auth)
    tracing = [trace_requests] if settings.tracing.enabled else []
    metrics = GatewayMetrics(settings.metrics)
    # aiohttp stops reading at client_max_size (Content-Length or chunked alike) and raises 413: a body is never
    # buffered beyond the limit.
    app = web.Application(
        middlewares=[
            *tracing,
            metrics.middleware,
            request_id_middleware,
            *([access_log_middleware] if settings.logging.access_log else []),
            error_middleware,
            auth_middleware(authenticator, metrics.public_paths()),
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app.on_response_prepare.append(send_request_id)
    if settings.logging.access_log:
        app.on_response_prepare.append(note_sent_status)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[MAX_BODY_BYTES] = settings.server.max_body_bytes
    app[SOCKET_COUNTS] = SocketCounts()
    gc_pacing.install(app, settings.server.gc_hold_seconds)
    app[WEBHOOK_SETTINGS] = webhook_settings(
        settings.webhooks, settings.storage.retention_seconds
    )  # now: a missing secret fails the start
    if not settings.auth.enabled and settings.server.host not in LOOPBACK_HOSTS:
        log.warning(
            "!!! auth is disabled and the gateway listens on %s: anyone who can reach it can use your upstream "
            "credentials and read every response. Set auth.enabled: true with auth.keys. !!!",
            settings.server.host,
        )
    app.cleanup_ctx.extend([_store_ctx, _upstreams_ctx, _live_events_ctx, _runs_ctx])
    if settings.tracing.enabled:
        app.cleanup_ctx.insert(0, tracing_ctx(tracer_provider))
    health.add_routes(app)
    input_tokens.add_routes(app)
    compaction.add_routes(app)
    responses.add_routes(app)
    steering.add_routes(app)
    models.add_routes(app)
    conversations.add_routes(app)
    metrics.watch(app)
    return app
