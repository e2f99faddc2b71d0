"""A small asyncio TCP proxy for network faults in tests: latency, a half-open (blackholed) peer, abrupt resets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

CHUNK_BYTES = 65_536


@dataclass(eq=False)
class ProxiedConnection:
    """One client connection and its upstream twin. `upstream_port` is the proxy's local port towards the target,
    i.e. the client address the target sees (e.g. `addr=` in Redis's CLIENT LIST)."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    upstream_port: int
    # Cleared while blackholed: nothing is forwarded either way, and neither side learns of the other's close.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            _abort(writer)


class TcpProxy:
    """Listens on a free loopback port and forwards every connection to `target_host:target_port`.

    Faults: `blackhole` stops forwarding on connections (both directions) while keeping their sockets open, as a
    peer that vanished without a reset looks; `resume` lets the held bytes through; `reset_all` closes every
    connection abruptly (RST); `latency_seconds` delays each forwarded chunk (so a round trip pays it twice).
    """

    def __init__(self, target_host: str, target_port: int, *, latency_seconds: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.latency_seconds = latency_seconds
        self.connections: list[ProxiedConnection] = []
        self._blackhole_new = False
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
            for pump in connection.pumps:
                pump.cancel()
            await asyncio.gather(*connection.pumps, return_exceptions=True)
        self.connections.clear()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def blackhole(self, connections: Iterable[ProxiedConnection] | None = None) -> None:
        """Stop forwarding on `connections`, or on every connection (current and new) when None."""
        if connections is None:
            self._blackhole_new = True
            connections = self.connections
        for connection in connections:
            connection.flowing.clear()

    def resume(self) -> None:
        """Forward again on every connection, held bytes first."""
        self._blackhole_new = False
        for connection in self.connections:
            connection.flowing.set()

    def reset_all(self) -> None:
        """Close every current connection abruptly, on both sides."""
        for connection in list(self.connections):
            connection.abort()

    def connection_from(self, upstream_port: int) -> ProxiedConnection | None:
        """The connection the target sees as coming from `upstream_port`."""
        return next((c for c in self.connections if c.upstream_port == upstream_port), None)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _abort(client_writer)
            return
        connection = ProxiedConnection(
            client_writer, upstream_writer, int(upstream_writer.get_extra_info("sockname")[1])
        )
        if not self._blackhole_new:
            connection.flowing.set()
        self.connections.append(connection)
        connection.pumps = [
            asyncio.create_task(self._pump(connection, client_reader, upstream_writer)),
            asyncio.create_task(self._pump(connection, upstream_reader, client_writer)),
        ]
        await asyncio.gather(*connection.pumps, return_exceptions=True)
        for writer in (client_writer, upstream_writer):
            writer.close()
        with contextlib.suppress(ValueError):
            self.connections.remove(connection)

    async def _pump(
        self, connection: ProxiedConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(CHUNK_BYTES):
                if self.latency_seconds:
                    await asyncio.sleep(self.latency_seconds)
                await connection.flowing.wait()
                writer.write(data)
                await writer.drain()
            # A close is held back too: behind a blackhole the other side never hears of it.
            await connection.flowing.wait()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            connection.abort()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0) rather than a FIN, as a dropped connection looks to its peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
