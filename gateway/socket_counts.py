"""How many WebSocket connections each tenant holds open, so one API key cannot hold every connection."""

from __future__ import annotations

from aiohttp import web


class SocketCounts:
    """Open sockets per tenant (each API key belongs to one), so one key cannot hold every connection."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str, limit: int) -> bool:
        if self._open.get(tenant, 0) >= limit:
            return False
        self._open[tenant] = self._open.get(tenant, 0) + 1
        return True

    def release(self, tenant: str) -> None:
        left = self._open.get(tenant, 1) - 1
        if left:
            self._open[tenant] = left
        else:
            self._open.pop(tenant, None)


SOCKET_COUNTS = web.AppKey("websocket_counts", SocketCounts)
