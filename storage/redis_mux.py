"""One Redis connection shared by every caller of the hot path, with its commands pipelined automatically.

redis-py gives each command in flight a connection of its own: twenty requests arriving together need twenty
connections (each new one several handshake round trips and a costly set-up in Python), and every command pays a
pool checkout and a timeout of its own. The hot path's commands (admission, appends, leases, settling, reads of a
response) go here instead: whatever callers queue in one loop turn is written in one go, and one reader takes the
replies in order (Redis answers each connection's commands in the order it got them). This is what Redis clients
call auto-pipelining. redis-py makes the connection (handshake, AUTH, SELECT, TLS); from then on the mux writes to
its transport and takes the replies in the transport's own callback (`_Replies`), with hiredis's C parser and no
reader task: a reply is handed to its caller in the same callback that received it.

A connection that breaks, or whose oldest command has waited COMMAND_TIMEOUT_SECONDS for its reply, is dropped:
every command in flight fails with StoreUnavailable (it may or may not have run, as with any lost reply; the
callers' steps are idempotent or checked) and the next command connects afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.base import StoreClosed, StoreUnavailable
from storage.redis_support import COMMAND_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
# How often the watchdog looks at the oldest command in flight.
WATCHDOG_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script's source and SHA1, to run by EVALSHA (loaded on first use: NOSCRIPT falls back to EVAL)."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> LuaScript:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


class RedisCommands(Protocol):
    """How the store runs its commands: over one node's auto-pipelined connection (RedisMux) or routed over a
    cluster (storage.redis_cluster.ClusterCommands). Raw replies; an error reply is returned, not raised, except
    by `script`; a lost connection is StoreUnavailable."""

    async def execute(self, *args: Any) -> Any: ...

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]: ...

    async def script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any: ...

    async def close(self) -> None: ...


async def run_script(commands: RedisCommands, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
    """Run a script by its SHA, loading it with EVAL when Redis does not know it yet; an error reply raises."""
    reply = await commands.execute("EVALSHA", script.sha, len(keys), *keys, *args)
    if isinstance(reply, NoScriptError):
        reply = await commands.execute("EVAL", script.source, len(keys), *keys, *args)
    if isinstance(reply, ResponseError):
        raise reply
    return reply


class RedisMux:
    """Runs commands over one auto-pipelined connection. `execute` returns Redis's raw reply (no redis-py response
    callbacks), with an error reply returned, not raised, so that callers decide what it means."""

    def __init__(self, client: aioredis.Redis, *, reply_timeout_seconds: float = COMMAND_TIMEOUT_SECONDS) -> None:
        self._reply_timeout = reply_timeout_seconds
        pool = client.connection_pool
        # No socket timeout: the reader waits for replies as long as commands are in flight, and the watchdog
        # bounds how long the oldest one may wait.
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._connection: aioredis.connection.AbstractConnection | None = None
        self._transport: asyncio.Transport | None = None
        self._connecting = asyncio.Lock()
        self._queued: list[tuple[tuple[Any, ...], _Reply]] = []
        # Each command sent and not yet answered: where its reply goes, and when it was sent (a plain tuple: one is
        # made per command on the hot path).
        self._in_flight: deque[tuple[_Reply, float]] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._closed = False
        self._bound_loop: asyncio.AbstractEventLoop | None = None

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The loop this mux runs on, looked up once: on Python 3.11 every `get_running_loop()` is a `getpid()`
        system call (its check for a fork), and this is called for every command."""
        loop = self._bound_loop
        if loop is None:
            loop = self._bound_loop = asyncio.get_running_loop()
        return loop

    async def execute(self, *args: Any) -> Any:
        """The raw reply to one command (a ResponseError instance for an error reply). Raises StoreUnavailable
        when the connection fails before the reply arrives."""
        if self._closed:
            raise StoreClosed("redis: the store is closed")
        reply: asyncio.Future[Any] = self._loop().create_future()
        self._queued.append((args, reply))
        self._schedule_flush()
        return await reply

    def send_then(self, commands: list[tuple[Any, ...]], then: Callable[[list[Any] | StoreUnavailable], None]) -> None:
        """Queue several commands, to be sent together and in order with this loop turn's others, and call `then`
        once with their raw replies (in order), or with the StoreUnavailable that failed them, for a caller that
        takes replies in a callback rather than a task (a task costs a wake-up per reply). No future per command
        and no loop step of its own: `then` runs inside the mux, in the transport callback that read the last
        reply (or where the connection is dropped or the mux closed), so it must not block, and may queue more
        commands (they are written at the next flush) but not wait for them."""
        if self._closed:
            raise StoreClosed("redis: the store is closed")
        if not commands:
            raise ValueError("send_then: no commands, so no reply would ever call back")
        batch = _Batch(len(commands), then)
        self._queued.extend([(command, batch) for command in commands])
        self._schedule_flush()

    def send_many(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        """Queue several commands, to be sent together and in order with this loop turn's others, and return their
        replies' futures (`execute_many` awaits the last). The last one done means all are: replies come in order,
        and a lost connection fails every command in flight at once."""
        if self._closed:
            raise StoreClosed("redis: the store is closed")
        loop = self._loop()
        replies = [loop.create_future() for _ in commands]
        self._queued.extend(zip(commands, replies, strict=True))
        self._schedule_flush()
        return replies

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The raw replies to several commands, sent together and in order."""
        replies = self.send_many(commands)
        try:
            # The last reply first. Cancelling this task cancels the one future it awaits at once, and the others
            # only when it next runs: a flush in between writes the commands whose futures are not done. Awaiting
            # the last, a cancel can drop only a suffix of the batch (a retry completes a stored prefix); awaiting
            # the first, it dropped a command and sent the ones after it (an event log got a hole). Replies arrive
            # in order, so once the last is done every one is.
            await replies[-1]
        except BaseException:
            for reply in replies:
                reply.cancel()  # no-op for those done; the rest are skipped or their replies dropped
            raise
        # Every one is done: `result()` is each reply (or raises its failure) without an await per command.
        return [reply.result() for reply in replies]

    async def script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        return await run_script(self, script, keys, args)

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._drop("redis: the store is closing")
        _fail_all(self._queued, StoreUnavailable("redis: the store is closing"))
        self._queued.clear()

    # -- writing --------------------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        """Write what is queued once this loop turn's callers have queued theirs: a callback, not a task step, on
        a connection that is up (the common case); the writer task connects first when it is not."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or (self._writer is not None and not self._writer.done()):
            self._wake.set()
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write_loop(), name="redis-mux-writer")
            return
        batch, self._queued = self._queued, []
        batch = [(args, reply) for args, reply in batch if not reply.done()]
        if not batch:
            return
        now = self._loop().time()
        self._in_flight.extend([(reply, now) for _, reply in batch])
        self._arm_watchdog()
        try:
            # The transport buffers what the socket does not take at once; replies pace the callers, so what
            # waits there is bounded by the commands in flight.
            transport.write(_pack(batch))
        except _CONNECTION_ERRORS as error:
            self._drop(f"redis: {error or type(error).__name__}")

    async def _write_loop(self) -> None:
        """Connects, and writes what is queued meanwhile; it ends once the connection is up and the queue empty
        (the flush callback writes from then on)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                batch, self._queued = self._queued, []
                batch = [(args, reply) for args, reply in batch if not reply.done()]  # callers that gave up
                if batch:
                    await self._send(batch)
            if self._connection is not None:
                return

    async def _send(self, batch: list[tuple[tuple[Any, ...], _Reply]]) -> None:
        try:
            transport = await self._connected()
            packed = _pack(batch)
        except _CONNECTION_ERRORS as error:
            _fail_all(batch, StoreUnavailable(f"redis: {error or type(error).__name__}"))
            return
        except asyncio.CancelledError:  # the mux is closing while it connects: nobody else will answer these
            _fail_all(batch, StoreClosed("redis: the store is closing"))
            raise
        now = self._loop().time()
        # In line for their replies before the write, so a reply can never arrive before its place in line.
        self._in_flight.extend([(reply, now) for _, reply in batch])
        self._arm_watchdog()
        try:
            transport.write(packed)
        except _CONNECTION_ERRORS as error:
            self._drop(f"redis: {error or type(error).__name__}")

    async def _connected(self) -> asyncio.Transport:
        async with self._connecting:
            if self._transport is None:
                connection = self._connection_class(**self._kwargs)
                await connection.connect()  # type: ignore[no-untyped-call]
                # The handshake's replies have all been read: from here on the replies come to `_Replies`.
                stream = getattr(connection, "_writer", None)
                if stream is None:
                    raise RedisConnectionError("redis: the connection has no transport")
                transport: asyncio.Transport = stream.transport
                transport.set_protocol(_Replies(self, connection, decode=connection.encoder.decode_responses))
                self._connection = connection
                self._transport = transport
            return self._transport

    # -- reading ------------------------------------------------------------------------------------------

    def _take_reply(self, connection: aioredis.connection.AbstractConnection, reply: Any) -> None:
        if connection is not self._connection:
            return  # a dropped connection's late reply: its callers have already been failed
        if not self._in_flight:  # a stray reply: this connection cannot be trusted any more
            self._drop("redis: a reply nobody asked for")
            return
        sent, _ = self._in_flight.popleft()
        if not sent.done():
            sent.set_result(reply)

    def _lost(self, connection: aioredis.connection.AbstractConnection, reason: str) -> None:
        if connection is self._connection:
            self._drop(reason)

    # -- failure ------------------------------------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            interval = min(WATCHDOG_SECONDS, self._reply_timeout / 4)
            self._watchdog = self._loop().call_later(interval, self._check_oldest)

    def _check_oldest(self) -> None:
        self._watchdog = None
        if not self._in_flight:
            return
        waited = self._loop().time() - self._in_flight[0][1]
        if waited >= self._reply_timeout:
            self._drop(f"redis: no reply in {self._reply_timeout:g}s")
            return
        self._arm_watchdog()

    def _drop(self, reason: str) -> None:
        """Give the connection up: everything in flight fails, the next command connects afresh."""
        connection, self._connection = self._connection, None
        self._transport = None
        while self._in_flight:
            sent, _ = self._in_flight.popleft()
            if not sent.done():
                sent.set_exception(StoreUnavailable(reason))
        if connection is not None:
            task = self._loop().create_task(connection.disconnect(nowait=True))
            task.add_done_callback(_ignore_result)


class _Reply(Protocol):
    """Where a command's reply goes: its future (`execute`, `send_many`) or its batch's callback (`send_then`)."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class _Batch:
    """The replies of one `send_then`, shared by its commands: collected in order, then handed to its callback
    at the last; a failure is handed over at once, and the rest of the batch skipped (`done`)."""

    __slots__ = ("_left", "_replies", "_then")

    def __init__(self, size: int, then: Callable[[list[Any] | StoreUnavailable], None]) -> None:
        self._left = size
        self._replies: list[Any] = []
        self._then: Callable[[list[Any] | StoreUnavailable], None] | None = then

    def done(self) -> bool:
        return self._then is None

    def set_result(self, result: Any) -> None:
        self._replies.append(result)
        self._left -= 1
        if self._left == 0:
            self._hand_over(self._replies)

    def set_exception(self, exception: BaseException) -> None:
        failure = exception if isinstance(exception, StoreUnavailable) else StoreUnavailable(str(exception))
        self._hand_over(failure)

    def _hand_over(self, outcome: list[Any] | StoreUnavailable) -> None:
        then, self._then = self._then, None
        if then is None:
            return
        try:
            then(outcome)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:  # the caller's trouble: the mux (and the replies after this one) must go on
            log.exception("a redis reply callback failed")


_NOT_ENOUGH_DATA = object()


def _reply_error(message: str) -> ResponseError:
    """An error reply as the exception callers look for (NOSCRIPT: the script must be loaded with EVAL)."""
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Replies(asyncio.Protocol):
    """The mux connection's replies, parsed as the bytes arrive and handed over in order."""

    def __init__(self, mux: RedisMux, connection: aioredis.connection.AbstractConnection, *, decode: bool) -> None:
        self._mux = mux
        self._connection = connection
        options: dict[str, Any] = {}
        if decode:
            options = {"encoding": connection.encoder.encoding, "errors": connection.encoder.encoding_errors}
        self._parser = hiredis.Reader(
            protocolError=InvalidResponse, replyError=_reply_error, notEnoughData=_NOT_ENOUGH_DATA, **options
        )

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not _NOT_ENOUGH_DATA:
                self._mux._take_reply(self._connection, reply)
        except InvalidResponse:
            self._mux._lost(self._connection, "redis: a reply that could not be parsed")

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._mux._lost(self._connection, f"redis: {exc or 'the server closed the connection'}")


def _pack(batch: list[tuple[tuple[Any, ...], _Reply]]) -> bytes:
    """The commands in Redis's wire format, packed by hiredis's C encoder (redis-py's own, in Python, was the
    largest single cost of the gateway at the ceiling)."""
    return b"".join([hiredis.pack_command(args) for args, _ in batch])


def _fail_all(batch: list[tuple[tuple[Any, ...], _Reply]], error: Exception) -> None:
    for _, reply in batch:
        if not reply.done():
            reply.set_exception(error)


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
