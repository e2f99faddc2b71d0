"""The auto-pipelined connection of the Redis store: every caller gets its own reply, in any interleaving, and a
connection that breaks or stops answering fails what is in flight, never a later command."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from storage.base import StoreUnavailable
from storage.redis_mux import LuaScript, RedisMux
from tests.tcp_proxy import TcpProxy


async def mux_over(url: str, **options: float) -> tuple[aioredis.Redis, RedisMux]:
    client = aioredis.Redis.from_url(url)
    return client, RedisMux(client, **options)


async def test_concurrent_callers_each_get_their_own_reply(redis_server: str, key_prefix: str) -> None:
    client, mux = await mux_over(redis_server)
    try:

        async def caller(n: int) -> None:
            for step in range(20):
                await asyncio.sleep(random.random() / 1000)
                key = f"{key_prefix}:{n}"
                assert await mux.execute("SET", key, f"{n}-{step}", "PX", 60_000) == b"OK"
                assert await mux.execute("GET", key) == f"{n}-{step}".encode()
                many = await mux.execute_many(
                    [("INCR", f"{key}:c"), ("INCR", f"{key}:c"), ("PEXPIRE", f"{key}:c", 60_000)]
                )
                assert many == [2 * step + 1, 2 * step + 2, 1]

        await asyncio.gather(*(caller(n) for n in range(50)))
        # An error reply is a value, and the next command still gets its own reply.
        assert isinstance(await mux.execute("INCR", "not a number", "extra"), ResponseError)
        assert await mux.execute("PING") == b"PONG"
        clients = await client.client_list()
        assert sum(entry.get("cmd") in ("get", "set", "incr", "pexpire", "ping") for entry in clients) <= 2
    finally:
        await mux.close()
        await client.aclose()


async def test_a_script_unknown_to_redis_is_loaded_once_and_an_error_raises(redis_server: str) -> None:
    client, mux = await mux_over(redis_server)
    try:
        script = LuaScript.of(f"return ARGV[1] .. '{random.random()}'")  # new to this Redis
        assert (await mux.script(script, [], ["x"])).startswith(b"x")
        assert await client.script_exists(script.sha) == [True]
        with pytest.raises(ResponseError):
            await mux.script(LuaScript.of("return redis.call('NOSUCHCOMMAND')"), [], [])
    finally:
        await mux.close()
        await client.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_others(redis_server: str, key_prefix: str) -> None:
    client, mux = await mux_over(redis_server)
    try:
        await mux.execute("SET", f"{key_prefix}:a", "a", "PX", 60_000)
        await mux.execute("SET", f"{key_prefix}:b", "b", "PX", 60_000)
        slow = asyncio.ensure_future(mux.execute("BLPOP", f"{key_prefix}:never", 0.2))
        after = asyncio.ensure_future(mux.execute("GET", f"{key_prefix}:a"))
        await asyncio.sleep(0.01)
        slow.cancel()
        assert await after == b"a"
        assert await mux.execute("GET", f"{key_prefix}:b") == b"b"
    finally:
        await mux.close()
        await client.aclose()


async def test_a_broken_connection_fails_what_is_in_flight_and_the_next_command_reconnects(
    redis_proxy: TcpProxy, key_prefix: str
) -> None:
    client, mux = await mux_over(f"redis://127.0.0.1:{redis_proxy.port}/0")
    try:
        assert await mux.execute("PING") == b"PONG"
        in_flight = asyncio.ensure_future(mux.execute("BLPOP", f"{key_prefix}:never", 5))
        await asyncio.sleep(0.05)
        redis_proxy.reset_all()
        with pytest.raises(StoreUnavailable):
            await in_flight
        assert await mux.execute("PING") == b"PONG"
    finally:
        await mux.close()
        await client.aclose()


async def test_a_batch_sent_with_a_callback_hears_its_replies_once_in_order(
    redis_proxy: TcpProxy, key_prefix: str
) -> None:
    """`send_then` (a run's delta append): the callback gets the batch's replies, in order, among awaited
    commands; a callback that raises costs nobody else their reply; a broken connection hands the batch's
    failure over once, whatever part of it was answered."""
    client, mux = await mux_over(f"redis://127.0.0.1:{redis_proxy.port}/0")
    key = f"{key_prefix}:then"
    heard: list[list[object] | StoreUnavailable] = []
    try:
        mux.send_then([("RPUSH", key, "a"), ("RPUSH", key, "b"), ("PEXPIRE", key, 60_000)], heard.append)

        def raises(_: object) -> None:
            raise RuntimeError("the caller's own bug")

        mux.send_then([("LLEN", key)], raises)
        awaited = asyncio.ensure_future(mux.execute("LRANGE", key, 0, -1))
        await asyncio.sleep(0)  # queued now, between the batches
        mux.send_then([("LLEN", key), ("INCR", key)], heard.append)  # an error reply is a value
        assert await awaited == [b"a", b"b"]
        assert await mux.execute("PING") == b"PONG"  # every reply before it has been handed over
        assert heard[0] == [1, 2, 1]
        second = heard[1]
        assert isinstance(second, list)
        assert second[0] == 2
        assert isinstance(second[1], ResponseError)
        assert len(heard) == 2

        mux.send_then([("PING",), ("BLPOP", f"{key_prefix}:never", 5)], heard.append)  # answered in part
        await asyncio.sleep(0.05)
        redis_proxy.reset_all()
        for _ in range(100):
            if len(heard) > 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(heard) == 3
        assert isinstance(heard[2], StoreUnavailable)
        assert await mux.execute("PING") == b"PONG"  # and the next command reconnects

        mux.send_then([("BLPOP", f"{key_prefix}:never", 5)], heard.append)
        await asyncio.sleep(0.05)
        await mux.close()  # a batch still waiting is told, not left waiting for ever
        assert len(heard) == 4
        assert isinstance(heard[3], StoreUnavailable)
    finally:
        await mux.close()
        await client.delete(key)
        await client.aclose()


async def test_a_connection_that_stops_answering_is_given_up_after_the_reply_timeout(redis_proxy: TcpProxy) -> None:
    client, mux = await mux_over(f"redis://127.0.0.1:{redis_proxy.port}/0", reply_timeout_seconds=0.5)
    try:
        assert await mux.execute("PING") == b"PONG"
        redis_proxy.blackhole(list(redis_proxy.connections))  # a half-open connection: no reset, no replies
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable):
            await mux.execute("PING")
        assert loop.time() - started < 3
        assert await mux.execute("PING") == b"PONG"  # a new connection, which flows
    finally:
        await mux.close()
        await client.aclose()


@pytest.mark.parametrize("yields_before_cancel", [0, 1, 2])
async def test_a_cancelled_batch_goes_out_whole_or_as_a_prefix_never_with_a_hole(
    redis_server: str, key_prefix: str, yields_before_cancel: int
) -> None:
    """A caller cancelled while its batch waits to be written: the batch may go out in part (the store's retry
    completes a stored prefix), but never without one of its earlier commands while later ones are written (an
    event log would get a hole: seen in the chaos test when a run was handed over mid-append)."""
    client, mux = await mux_over(redis_server)
    key = f"{key_prefix}:batch"
    try:
        for _ in range(20):
            await client.delete(key)
            task = asyncio.create_task(mux.execute_many([("RPUSH", key, item) for item in "abcd"]))
            for _ in range(yields_before_cancel):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await mux.execute("PING")  # whatever was written has been applied
            stored = [item.decode() for item in await client.lrange(key, 0, -1)]
            assert stored == list("abcd")[: len(stored)], stored
    finally:
        await client.delete(key)
        await mux.close()
        await client.aclose()


async def test_commands_waiting_for_a_connection_fail_when_the_mux_closes() -> None:
    """Redis accepts the connection and never answers its handshake: the commands sent meanwhile (one begun
    without a task among them, as a run's delta is) are failed by close(), not left waiting for ever."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # whatever the handshake says, no answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", client_name="mux-test")
    mux = RedisMux(client)
    try:
        begun = mux.send_many([("SET", "k", "v")])
        awaited = asyncio.ensure_future(mux.execute("GET", "k"))
        for _ in range(100):  # until the mux is connecting: its handshake waits on the silent server
            await asyncio.sleep(0.01)
            if accepted:
                break
        assert accepted
        await mux.close()
        assert isinstance(begun[0].exception(), StoreUnavailable)
        with pytest.raises(StoreUnavailable):
            await awaited
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await client.aclose()
