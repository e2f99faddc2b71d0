"""What became of a request, for the middlewares that report on it (access log, metrics): the status its handler
answered with (or raised), and whether the client left first (the handler was cancelled)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler


@dataclass(slots=True)
class Outcome:
    status: int = 500  # what an exception other than an HTTP error would have become
    client_left: bool = False


async def answered(request: web.Request, handler: Handler, outcome: Outcome) -> web.StreamResponse:
    """`handler(request)`, recording its outcome in `outcome` however it ends."""
    try:
        response = await handler(request)
    except web.HTTPException as error:
        outcome.status = error.status
        raise
    except asyncio.CancelledError:
        outcome.client_left = True
        raise
    outcome.status = response.status
    return response
