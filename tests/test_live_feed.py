"""The live event feed when its Redis connection goes half-open: the stalled read is noticed and replaced within a
bound, so followers keep getting events live instead of in bursts at each heartbeat."""

from __future__ import annotations

import asyncio
import itertools
import logging

import aiohttp
import pytest
import redis.asyncio as aioredis

from runs.live import IDLE_TIMER_SLACK_SECONDS, LiveSubscription
from storage.base import StoredEvent
from tests.conftest import eventually, gateway_settings, serve_gateway
from tests.helpers import Frame, expected_text, parse_frame
from tests.tcp_proxy import ProxiedConnection, TcpProxy

# Long enough that a follower falling back to the store at its idle timeout stands out from live delivery.
HEARTBEAT_SECONDS = 20.0
# Well under the heartbeat, and above the feed's own bound for noticing a dead read (block cap + reply margin)
# plus its first retry delay.
MAX_GAP_SECONDS = 3.5
SIM_TOKENS = 60
SIM_TOKEN_DELAY_MS = 100
FAULT_AFTER_EVENTS = 8
TERMINAL_EVENTS = {"response.completed", "response.failed", "response.incomplete"}


async def feed_connections(redis: aioredis.Redis, proxy: TcpProxy) -> list[ProxiedConnection]:
    """The proxied connections whose last command was XREAD: the live feed's (a dead one lingers at Redis)."""
    found = []
    for client in await redis.client_list():
        if client["cmd"] == "xread":
            connection = proxy.connection_from(int(client["addr"].rsplit(":", 1)[1]))
            if connection is not None:
                found.append(connection)
    return found


async def test_a_half_open_feed_connection_is_replaced_and_events_keep_flowing(
    redis_proxy: TcpProxy,
    redis_client: aioredis.Redis,
    redis_server: str,
    simulator_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Scenario "half-open Redis connection": the feed's connection stops delivering without a reset (other and
    new connections still work). Events keep arriving with gaps far under the heartbeat, the stream ends with
    one terminal event, sequence numbers are contiguous, and the failure is logged once. The response runs on
    another instance (its own subscribers get its events handed over, with no feed): this one follows it."""
    caplog.set_level(logging.WARNING, logger="runs.live")
    writer_settings = gateway_settings(storage_url=redis_server, simulator_url=simulator_url, key_prefix=key_prefix)
    settings = gateway_settings(
        storage_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
        simulator_url=simulator_url,
        key_prefix=key_prefix,
        sse={"heartbeat_seconds": HEARTBEAT_SECONDS},
    )
    prompt = "half-open feed"
    body = {
        "model": "sim-1",
        "input": prompt,
        "background": True,
        "metadata": {"sim_tokens": str(SIM_TOKENS), "sim_token_delay_ms": str(SIM_TOKEN_DELAY_MS)},
    }
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, Frame]] = []
    frozen: ProxiedConnection | None = None
    fault_at = 0.0
    async with (
        serve_gateway(writer_settings) as writer,
        serve_gateway(settings) as gateway,
        aiohttp.ClientSession(base_url=gateway.url, timeout=aiohttp.ClientTimeout(total=50)) as http,
    ):
        async with writer.http.post("/v1/responses", json=body) as created:
            assert created.status == 200, await created.text()
            response_id = (await created.json())["id"]
        async with http.get(f"/v1/responses/{response_id}", params={"stream": "true"}) as stream:
            assert stream.status == 200, await stream.text()
            buffer = b""
            async for chunk in stream.content.iter_any():
                buffer += chunk
                now = loop.time()
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    frame = parse_frame(raw + b"\n\n")
                    if frame.data is not None:
                        arrivals.append((now, frame))
                if frozen is None and len(arrivals) >= FAULT_AFTER_EVENTS:
                    [frozen] = await eventually(lambda: feed_connections(redis_client, redis_proxy))
                    redis_proxy.blackhole([frozen])
                    fault_at = loop.time()
        # The feed reads on a fresh connection now; the frozen one is left to its fate, as after a failover.
        reading_on = await feed_connections(redis_client, redis_proxy)

    assert frozen is not None, f"the stream ended after {len(arrivals)} events, before the fault"
    frames = [frame for _, frame in arrivals]
    assert [frame.number for frame in frames] == list(range(len(frames)))
    assert frames[-1].event in TERMINAL_EVENTS
    assert sum(frame.event in TERMINAL_EVENTS for frame in frames) == 1
    text = "".join(f.data["delta"] for f in frames if f.event == "response.output_text.delta")  # type: ignore[index]
    assert text == expected_text(prompt, tokens=SIM_TOKENS)

    after_fault = [fault_at, *(at for at, _ in arrivals if at >= fault_at)]
    assert len(after_fault) > 10, "the run ended too soon after the fault to show anything"
    gaps = [later - earlier for earlier, later in itertools.pairwise(after_fault)]
    assert max(gaps) < MAX_GAP_SECONDS, f"events stalled for {max(gaps):.1f}s after the feed connection went dead"
    assert any(connection is not frozen for connection in reading_on), "no feed read on a fresh connection"

    warnings = [record for record in caplog.records if record.name == "runs.live"]
    assert len(warnings) == 1, [record.getMessage() for record in warnings]


async def test_a_subscriber_hears_of_idleness_only_after_a_whole_idle_wait_without_events() -> None:
    # The idle timer is set once and moved on lazily: when it fires while events keep coming it must not end a wait
    # early, and once they stop the wait still ends (a heartbeat is due).
    subscription = LiveSubscription("resp_idle", capacity=16)
    idle_seconds = 0.2
    stop = asyncio.Event()

    async def pace() -> None:
        for number in itertools.count():
            if stop.is_set():
                return
            subscription.push(StoredEvent(number, "response.output_text.delta", b"{}"))
            await asyncio.sleep(idle_seconds / 4)

    pacer = asyncio.create_task(pace())
    received = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while loop.time() - started < 3 * idle_seconds:  # the first timer fires (and is moved on) meanwhile
            received.append(await subscription.next(idle_seconds))
    finally:
        stop.set()
        await pacer
    assert None not in received
    subscription.take_ready()
    waited_from = loop.time()
    assert await subscription.next(idle_seconds) is None
    assert loop.time() - waited_from >= idle_seconds - IDLE_TIMER_SLACK_SECONDS
    subscription.stop_idle_timer()


async def test_a_shorter_idle_wait_after_a_longer_one_ends_on_time() -> None:
    subscription = LiveSubscription("resp_idle_shorter", capacity=16)
    waiting = asyncio.ensure_future(subscription.next(30))  # sets the timer 30 s ahead
    await asyncio.sleep(0)
    subscription.push(StoredEvent(0, "response.output_text.delta", b"{}"))
    assert await waiting is not None
    # The timer set for the 30 s wait must not be the one this wait gets.
    assert await asyncio.wait_for(subscription.next(0.05), 5) is None
    subscription.stop_idle_timer()
