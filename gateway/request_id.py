"""Request ids: one per HTTP request, sent back as `x-request-id` and named in the gateway's log lines."""

from __future__ import annotations

import re
import secrets

from aiohttp import web
from aiohttp.typedefs import Handler

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = web.RequestKey("request_id", str)
# A client's own id is kept when it is short and plain (it ends up in logs); anything else gets ours instead.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(request: web.Request) -> str:
    offered = request.headers.get(REQUEST_ID_HEADER)
    if offered is not None and _CLIENT_ID.fullmatch(offered):
        return offered
    return f"req_{secrets.token_hex(16)}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Names the request before anything else runs (errors included)."""
    request[REQUEST_ID] = _request_id(request)
    return await handler(request)


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every response carries its request's id, streams included (set before their
    headers go out). The SDK reads it as `response._request_id`."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


def request_id_of(request: web.Request) -> str:
    return request.get(REQUEST_ID) or "-"
