"""Liveness and readiness probes."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import json_response
from gateway.state import STORE


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The store answers, so this instance can take requests."""
    try:
        await request.app[STORE].ping()
    except Exception as error:
        return json_response({"status": "unavailable", "reason": type(error).__name__}, status=503)
    return json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
