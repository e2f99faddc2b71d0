"""Liveness and readiness probes."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import json_response
from gateway.state import RUN_MANAGER, STORE
from runs.store import check_reachable

# A store slower than this to answer a ping counts as unreachable.
READY_TIMEOUT_SECONDS = 2.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The store answers and the instance is not shutting down, so it can take requests."""
    if request.app[RUN_MANAGER].draining:
        return json_response({"status": "draining"}, status=503)
    try:
        await check_reachable(request.app[STORE], timeout_seconds=READY_TIMEOUT_SECONDS)
    except Exception as error:
        return json_response({"status": "unavailable", "reason": type(error).__name__}, status=503)
    return json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
