"""The access log: one line per request on `gateway.access`, written when the response has ended."""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.auth import PRINCIPAL, PUBLIC_PATHS
from gateway.outcome import Outcome, answered
from gateway.request_id import request_id_of

log = logging.getLogger("gateway.access")

# The response a request created (a route that addresses one names it in its path, `{response_id}`).
RESPONSE_ID = web.RequestKey("response_id", str)
_SENT_STATUS = web.RequestKey("sent_status", int)
# What a request that ended before any response was sent is logged with (nginx's "client closed request").
CLIENT_CLOSED_STATUS = 499
# Query parameters the gateway reads, none of them a secret; any other parameter is logged by name only, since a
# client may put anything there (an `api-key=…` meant for another proxy, say).
_LOGGED_QUERY_VALUES = frozenset(
    {"stream", "starting_after", "include", "include[]", "limit", "order", "after", "before", "resume"}
)
_MAX_VALUE_CHARS = 64
# A response id from the path is logged only when it could be one (the path, encoded, shows whatever it was).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def logged_path(request: web.Request) -> str:
    """The path as sent (percent-encoded, so one line stays one line), and its query with the values of unknown
    parameters left out."""
    path = request.rel_url.raw_path
    if not request.query:
        return path
    parts = []
    for name, value in request.query.items():
        shown = "=" + quote(value[:_MAX_VALUE_CHARS], safe=",") if name in _LOGGED_QUERY_VALUES else ""
        parts.append(quote(name, safe="[]") + shown)
    return f"{path}?{'&'.join(parts)}"


async def note_sent_status(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the status that went out, for a request cancelled after its headers were sent."""
    request[_SENT_STATUS] = response.status


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside the error middleware, so it sees the status the client got. A stream (SSE or WebSocket) is logged
    when it ends, with the time to its end. Nothing from the Authorization header is logged: the tenant is the
    name the key maps to."""
    started = time.perf_counter()
    outcome = Outcome()
    try:
        return await answered(request, handler, outcome)
    finally:
        # A client that left got the status already sent, if any.
        status = request.get(_SENT_STATUS, CLIENT_CLOSED_STATUS) if outcome.client_left else outcome.status
        # Probes that pass come every few seconds from every orchestrator: DEBUG, so they do not drown the rest.
        level = logging.DEBUG if request.path in PUBLIC_PATHS and status < 400 else logging.INFO
        if log.isEnabledFor(level):
            _log_request(request, level, status, (time.perf_counter() - started) * 1000, outcome.client_left)


def _addressed_response(request: web.Request) -> str | None:
    addressed = request.match_info.get("response_id")
    return addressed if addressed is not None and _PLAIN_ID.fullmatch(addressed) else None


def _log_request(request: web.Request, level: int, status: int, duration_ms: float, client_closed: bool) -> None:
    principal = request.get(PRINCIPAL)
    fields = {
        "method": request.method,
        "path": logged_path(request),
        "status": status,
        "duration_ms": round(duration_ms, 1),
        "tenant": principal.tenant if principal is not None else None,
        "response_id": request.get(RESPONSE_ID) or _addressed_response(request),
        "request_id": request_id_of(request),
        "client_closed": client_closed,
    }
    log.log(
        level,
        "%s %s %d %.1fms tenant=%s response=%s request=%s%s",
        fields["method"],
        fields["path"],
        status,
        duration_ms,
        fields["tenant"] or "-",
        fields["response_id"] or "-",
        fields["request_id"],
        " (client closed)" if client_closed else "",
        extra=fields,
    )
