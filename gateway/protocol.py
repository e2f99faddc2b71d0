"""The HTTP connection before a request reaches the application: what aiohttp answers by itself (a request that is
not valid HTTP) is answered in the OpenAI envelope and logged in one line that repeats nothing the client sent
(aiohttp's own answer and log echo the offending header line, an API key included); and one peer may hold only so
many connections.

Idle connections (none sent, or nothing since the last response), and requests whose headers never finish
(slowloris), are closed by aiohttp's keep-alive timer, which runs from the connection's start and is not reset by
a partial request; `server.idle_timeout_seconds` sets it (aiohttp's default is an hour)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import orjson
from aiohttp import http_exceptions, web, web_protocol
from aiohttp.web_request import BaseRequest

log = logging.getLogger("gateway.protocol")

# What each of aiohttp's parse errors means, in words that quote nothing of the request.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "a request line or header is too long"),
    (http_exceptions.InvalidHeader, "a header is malformed"),
    (http_exceptions.BadHttpMethod, "the method is not valid"),
    (http_exceptions.BadStatusLine, "the request line is not valid"),
    (http_exceptions.InvalidURLError, "the URL is not valid"),
    (http_exceptions.ContentLengthError, "the body does not match its Content-Length"),
    (http_exceptions.TransferEncodingError, "the chunked body is malformed"),
    (http_exceptions.ContentEncodingError, "the body does not match its Content-Encoding"),
    (http_exceptions.PayloadEncodingError, "the body is malformed"),
)


def reason_of(error: BaseException | None) -> str:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "the request line or a header is malformed"


# After an answer given before the body was read (a 408, a 413), the rest of the body is read and dropped for this
# long before the connection closes, so a client still sending it sees the answer (aiohttp's default: 10 s).
LINGERING_SECONDS = 2.0


class GatewayRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with the envelope for its own errors and a per-peer connection cap."""

    _peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if not isinstance(server, GatewayServer):
            return
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) and peer else None
        if self._peer is None:
            return
        server.connections_by_peer[self._peer] += 1
        if server.max_connections_per_peer and server.connections_by_peer[self._peer] > server.max_connections_per_peer:
            if self._peer not in server.warned_peers:
                server.warned_peers.add(self._peer)
                log.warning(
                    "%s holds more than %d connections (server.max_connections_per_ip): refusing the rest",
                    self._peer,
                    server.max_connections_per_peer,
                )
            self.force_close()
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        if isinstance(server, GatewayServer) and self._peer is not None:
            server.connections_by_peer[self._peer] -= 1
            if server.connections_by_peer[self._peer] <= 0:
                del server.connections_by_peer[self._peer]
                server.warned_peers.discard(self._peer)
            self._peer = None
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp logs a traceback when the unread rest of a body turns out malformed (a plain body sent as gzip):
        # the client's doing, and its text may quote the request. One line, quoting nothing.
        error = kw.get("exc_info")
        if isinstance(error, web_protocol.RequestPayloadError | http_exceptions.HttpProcessingError):
            log.info("dropped the connection of a request whose body was malformed: %s", reason_of(error.__cause__))
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            # Not the client's doing: the one place a traceback belongs (a handler failed outside the middleware).
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            error = {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        else:
            reason = reason_of(exc)
            log.info("refused a request from %s that is not valid HTTP: %s", request.remote, reason)
            error = {
                "message": f"The request is not valid HTTP: {reason}.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_http_request",
            }
        response = web.Response(status=status, body=orjson.dumps({"error": error}), content_type="application/json")
        response.force_close()
        return response


class GatewayServer(web.Server):
    """aiohttp's server, making GatewayRequestHandler connections; it counts each peer's open connections."""

    max_connections_per_peer = 0  # 0: no cap
    connections_by_peer: Counter[str]
    warned_peers: set[str]  # peers over the cap, warned of once until they are back under it

    def __call__(self) -> web_protocol.RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """AppRunner whose server is a GatewayServer."""

    def __init__(self, app: web.Application, *, max_connections_per_peer: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("lingering_time", LINGERING_SECONDS)
        super().__init__(app, **kwargs)
        self._max_connections_per_peer = max_connections_per_peer

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same server, made to build our handler: aiohttp builds it in Application._make_handler, with
        # arguments this runner does not see, so its class is changed rather than the server made again.
        server.__class__ = GatewayServer
        assert isinstance(server, GatewayServer)
        server.max_connections_per_peer = self._max_connections_per_peer
        server.connections_by_peer = Counter()
        server.warned_peers = set()
        return server
