"""The application factory: state, resources (store, upstreams, run manager) and routes of one gateway."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.auth import Authenticator, auth_middleware
from gateway.config import Settings
from gateway.errors import MAX_BODY_BYTES, error_middleware
from gateway.metrics import METRICS, GatewayMetrics
from gateway.request_id import request_id_middleware, send_request_id
from gateway.routes import compaction, conversations, health, input_tokens, models, responses, steering
from gateway.state import FAULTS, LIVE_EVENTS, OWNERSHIP, ROUTER, RUN_MANAGER, SETTINGS, STORE
from gateway.websocket import SOCKET_COUNTS, SocketCounts
from runs.faults import FaultPoints
from runs.lifecycle import Lifecycle, RunSettings
from runs.live import LiveEvents
from runs.manager import RunManager
from runs.ownership import Ownership
from runs.store import open_store
from runs.upstream.base import UpstreamSpec
from runs.upstream.router import UpstreamRouter
from simulator import SimulatorSettings, create_simulator_app

log = logging.getLogger("gateway")

SIMULATOR_UPSTREAM = "simulator"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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
    )
    lifecycle = Lifecycle(
        app[STORE],
        run_settings,
        app.get(FAULTS) or FaultPoints.from_environment(),
        publisher=app[LIVE_EVENTS],
        metrics=app[METRICS].runs,
    )
    manager = RunManager(app[STORE], app[ROUTER], run_settings, lifecycle=lifecycle)
    manager.start()
    ownership = Ownership(manager, app[STORE])
    ownership.start()
    app[RUN_MANAGER] = manager
    app[OWNERSHIP] = ownership
    log.info("instance %s: up to %d concurrent runs", run_settings.instance_id, run_settings.max_concurrent)
    yield
    await ownership.close()
    await manager.close()


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


def create_app(settings: Settings) -> web.Application:
    """A gateway application. Resources are opened on startup and closed on cleanup, in dependency order."""
    authenticator = Authenticator(settings.auth)
    metrics = GatewayMetrics(settings.metrics)
    # aiohttp stops reading at client_max_size (Content-Length or chunked alike) and raises 413: a body is never
    # buffered beyond the limit.
    app = web.Application(
        middlewares=[
            metrics.middleware,
            request_id_middleware,
            error_middleware,
            auth_middleware(authenticator, metrics.public_paths()),
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app.on_response_prepare.append(send_request_id)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[MAX_BODY_BYTES] = settings.server.max_body_bytes
    app[SOCKET_COUNTS] = SocketCounts()
    if not settings.auth.enabled and settings.server.host not in LOOPBACK_HOSTS:
        log.warning(
            "!!! auth is disabled and the gateway listens on %s: anyone who can reach it can use your upstream "
            "credentials and read every response. Set auth.enabled: true with auth.keys. !!!",
            settings.server.host,
        )
    app.cleanup_ctx.extend([_store_ctx, _upstreams_ctx, _live_events_ctx, _runs_ctx])
    health.add_routes(app)
    input_tokens.add_routes(app)
    compaction.add_routes(app)
    responses.add_routes(app)
    steering.add_routes(app)
    models.add_routes(app)
    conversations.add_routes(app)
    metrics.watch(app)
    return app
