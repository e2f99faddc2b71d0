"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.errors import json_response
from gateway.state import RUN_MANAGER, STORE

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
        await asyncio.wait_for(request.app[STORE].ping(), READY_TIMEOUT_SECONDS)
    except Exception as error:
        return json_response({"status": "unavailable", "reason": type(error).__name__}, status=503)
    return json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
