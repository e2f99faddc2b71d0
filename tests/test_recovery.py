"""No response stuck forever: crash takeover, fencing, graceful shutdown, capacity, Redis outages. Real processes."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from openai.types.responses import ResponseCreatedEvent, ResponseFailedEvent, ResponseStreamEvent
from redis.asyncio.cluster import RedisCluster

from gateway.config import load_settings
from storage.keys import KeySpace
from tests.conftest import (
    GatewayProcess,
    eventually,
    free_port,
    redis_gateway_env,
    serve_gateway,
    stop_process,
    wait_for_port,
)
from tests.helpers import Frame, expected_text, sdk_for, stream_frames

FAST_LEASES = {
    "GATEWAY_RUNS__LEASE_SECONDS": "2",
    "GATEWAY_RUNS__RENEW_SECONDS": "0.5",
    "GATEWAY_RUNS__SWEEP_SECONDS": "0.3",
}
TERMINAL = {"response.completed", "response.failed", "response.incomplete"}


def assert_clean_log(frames: list[Frame]) -> None:
    """Contiguous from 0, no duplicate, exactly one terminal event, and it is the last."""
    assert_clean_sequence([(frame.event, frame.number) for frame in frames])


def assert_clean_sequence(events: list[tuple[str | None, int]]) -> None:
    """The same, of (type, sequence number) pairs: what an SDK client saw."""
    assert [number for _, number in events] == list(range(len(events)))
    assert sum(kind in TERMINAL for kind, _ in events) == 1
    assert events[-1][0] in TERMINAL


@pytest.fixture
def fleet(
    start_gateway_process: Callable[..., GatewayProcess], shared_redis_url: str, simulator_url: str, key_prefix: str
) -> Callable[..., GatewayProcess]:
    """Start gateway processes on the shared Redis (one node, or a cluster) with short leases."""

    def start(**extra: str) -> GatewayProcess:
        env = redis_gateway_env(shared_redis_url, simulator_url, key_prefix, **FAST_LEASES, **extra)
        return start_gateway_process(env)

    return start


async def wait_for_output(client: openai.AsyncOpenAI, response_id: str) -> None:
    async def has_output() -> bool:
        return bool((await client.responses.retrieve(response_id)).output)

    await eventually(has_output)


async def test_sigkill_after_output_ends_the_run_failed_on_another_instance(
    fleet: Callable[..., GatewayProcess],
) -> None:
    a, b = fleet(), fleet()
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        created = await client_a.responses.create(
            model="sim-1",
            input="killed midway",
            background=True,
            metadata={"sim_token_delay_ms": "100", "sim_tokens": "60"},
        )
        await wait_for_output(client_b, created.id)
        subscriber = asyncio.create_task(stream_frames(b.url, created.id))  # attached on B while A still runs
        a.process.send_signal(signal.SIGKILL)
        frames = await asyncio.wait_for(subscriber, 15)  # lease (2 s) + sweep (0.3 s), with room to spare
        assert_clean_log(frames)
        final = frames[-1].data["response"]  # type: ignore[index]
        assert final["status"] == "failed"
        assert final["error"]["code"] == "server_error"
        partial = "".join(f.data["delta"] for f in frames if f.event == "response.output_text.delta")  # type: ignore[index]
        assert partial
        stored = await client_b.responses.retrieve(created.id)
        assert stored.status == "failed"
        assert stored.output_text == partial
    finally:
        await client_a.close()
        await client_b.close()


async def test_sigkill_before_output_restarts_the_run_elsewhere(
    fleet: Callable[..., GatewayProcess], shared_redis_client: aioredis.Redis | RedisCluster, key_prefix: str
) -> None:
    a, b = fleet(), fleet()
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        created = await client_a.responses.create(
            model="sim-1", input="restart me", background=True, metadata={"sim_ttft_ms": "60000"}
        )

        async def in_progress() -> bool:
            return (await client_b.responses.retrieve(created.id)).status == "in_progress"

        await eventually(in_progress)
        a.process.send_signal(signal.SIGKILL)

        # The restarted run asks the simulator again; with the same metadata it would wait a minute, so the
        # subscriber only checks that B took it and the stream simply goes on.
        async def taken_over() -> bool:
            owner = await shared_redis_client.hget(KeySpace(key_prefix).response_state(created.id), "recovery_count")
            return owner == b"1"

        await eventually(taken_over, within=15)
        await client_b.responses.cancel(created.id)
        frames = await stream_frames(b.url, created.id)
        assert_clean_log(frames)
        assert [f.event for f in frames[:3]] == ["response.created", "response.in_progress", "response.failed"]
    finally:
        await client_a.close()
        await client_b.close()


async def test_restarted_run_completes_with_the_same_text(
    fleet: Callable[..., GatewayProcess], shared_redis_client: aioredis.Redis | RedisCluster, key_prefix: str
) -> None:
    """With no output emitted yet, the instance that takes over restarts the run and it completes."""
    a = fleet(GATEWAY_SHUTDOWN__GRACE_SECONDS="0")
    b = fleet()
    client_b = sdk_for(b.url)
    try:
        created = await client_b.responses.create(
            model="sim-1", input="first attempt dies", background=True, metadata={"sim_tokens": "5"}
        )
        # Make A the owner of a fresh run that is still waiting for its first token, then kill A.
        client_a = sdk_for(a.url)
        try:
            slow = await client_a.responses.create(
                model="sim-1",
                input="restart and finish",
                background=True,
                metadata={"sim_ttft_ms": "1500", "sim_tokens": "5"},
            )
        finally:
            await client_a.close()
        a.process.send_signal(signal.SIGKILL)

        async def completed() -> bool:
            return (await client_b.responses.retrieve(slow.id)).status == "completed"

        await eventually(completed, within=20)
        final = await client_b.responses.retrieve(slow.id)
        assert final.output_text == expected_text("restart and finish", tokens=5)
        assert await shared_redis_client.hget(KeySpace(key_prefix).response_state(slow.id), "recovery_count") == b"1"
        assert_clean_log(await stream_frames(b.url, slow.id))
        assert (await client_b.responses.retrieve(created.id)).status == "completed"
    finally:
        await client_b.close()


async def test_a_paused_owner_is_fenced_out_after_takeover(fleet: Callable[..., GatewayProcess]) -> None:
    """SIGSTOP of the owner past its lease, takeover, SIGCONT: every write of the old owner is rejected."""
    a, b = fleet(), fleet()
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        created = await client_a.responses.create(
            model="sim-1",
            input="paused owner",
            background=True,
            metadata={"sim_token_delay_ms": "50", "sim_tokens": "200"},
        )
        await wait_for_output(client_b, created.id)
        a.process.send_signal(signal.SIGSTOP)
        try:

            async def taken_over() -> bool:
                return (await client_b.responses.retrieve(created.id)).status == "failed"

            await eventually(taken_over, within=15)
            before = await stream_frames(b.url, created.id)
        finally:
            a.process.send_signal(signal.SIGCONT)
        await asyncio.sleep(1.5)  # the old owner wakes up with buffered model output and tries to write it
        after = await stream_frames(b.url, created.id)
        assert_clean_log(after)
        assert [frame.raw for frame in after] == [frame.raw for frame in before]
        assert "lease" in a.log() or "another instance" in a.log()
    finally:
        await client_a.close()
        await client_b.close()


async def until_draining(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as http:

        async def draining() -> bool:
            async with http.get(f"{gateway.url}/readyz") as reply:
                return reply.status == 503

        await eventually(draining, within=5)


async def test_sigterm_lets_a_short_run_finish(fleet: Callable[..., GatewayProcess]) -> None:
    a = fleet(GATEWAY_SHUTDOWN__GRACE_SECONDS="10")
    client = sdk_for(a.url)
    try:
        created = await client.responses.create(
            model="sim-1", input="short run", background=True, metadata={"sim_token_delay_ms": "50", "sim_tokens": "20"}
        )
        a.process.send_signal(signal.SIGTERM)
        await until_draining(a)
        with pytest.raises(openai.InternalServerError):  # 503: new runs are refused while draining
            await client.responses.create(model="sim-1", input="too late")
        returncode = await asyncio.to_thread(a.process.wait, 20)
        assert returncode == 0
    finally:
        await client.close()
    b = fleet()
    client_b = sdk_for(b.url)
    try:
        final = await client_b.responses.retrieve(created.id)
        assert final.status == "completed"  # finished before the process exited
        assert final.output_text == expected_text("short run")
    finally:
        await client_b.close()


async def test_sigterm_hands_a_long_run_over_at_the_grace_deadline(fleet: Callable[..., GatewayProcess]) -> None:
    a = fleet(GATEWAY_SHUTDOWN__GRACE_SECONDS="1")
    b = fleet()
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        created = await client_a.responses.create(
            model="sim-1", input="long run", background=True, metadata={"sim_ttft_ms": "3000", "sim_tokens": "5"}
        )
        a.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.process.wait, 20) == 0

        async def completed() -> bool:
            return (await client_b.responses.retrieve(created.id)).status == "completed"

        await eventually(completed, within=20)  # released at the deadline: B restarts it (no output yet)
        assert (await client_b.responses.retrieve(created.id)).output_text == expected_text("long run", tokens=5)
        assert "handing" in a.log()
    finally:
        await client_a.close()
        await client_b.close()


async def signal_twice(gateway: GatewayProcess, signum: signal.Signals = signal.SIGTERM) -> float:
    """SIGTERM (or `signum`), then (once it is draining, so the two are not one pending signal) the same again;
    returns the seconds from the second signal to the exit."""
    gateway.process.send_signal(signum)
    await until_draining(gateway)
    loop = asyncio.get_running_loop()
    second = loop.time()
    gateway.process.send_signal(signum)
    assert await asyncio.to_thread(gateway.process.wait, 20) == 0
    return loop.time() - second


SLOW_OUTPUT = {"sim_token_delay_ms": "100", "sim_tokens": "600"}  # a minute of output


async def stream_until_signalled_twice(
    client: openai.AsyncOpenAI, gateway: GatewayProcess, signum: signal.Signals
) -> tuple[list[ResponseStreamEvent], float]:
    """A long background response streamed through the SDK, the gateway signalled twice once output has started
    (Ctrl-C twice): the events the client saw, and the seconds from the second signal to the exit."""
    stream = await client.responses.create(
        model="sim-1", input="long", stream=True, background=True, metadata=SLOW_OUTPUT
    )
    seen: list[ResponseStreamEvent] = []
    exit_seconds = float("nan")
    async for event in stream:
        seen.append(event)
        if len(seen) == 5:
            exit_seconds = await signal_twice(gateway, signum)
    return seen, exit_seconds


def numbered(events: list[ResponseStreamEvent]) -> list[tuple[str | None, int]]:
    return [(event.type, event.sequence_number) for event in events]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_second_signal_ends_local_runs_at_once_on_the_embedded_store(
    start_gateway_process: Callable[..., GatewayProcess], signum: signal.Signals
) -> None:
    gateway = start_gateway_process({"GATEWAY_SHUTDOWN__GRACE_SECONDS": "60"})
    async with sdk_for(gateway.url) as client:
        seen, exit_seconds = await stream_until_signalled_twice(client, gateway, signum)
    assert exit_seconds < 5  # not the 60 s grace
    # Nobody to hand it over to: the run ends here, and the live client gets the terminal event before the
    # process goes.
    assert_clean_sequence(numbered(seen))
    assert isinstance(seen[-1], ResponseFailedEvent)
    assert seen[-1].response.error is not None
    assert seen[-1].response.error.message == "The gateway shut down before the response finished."


async def test_a_second_sigint_hands_a_live_stream_over_on_redis(fleet: Callable[..., GatewayProcess]) -> None:
    """The stream from the instance going away ends without a terminal event (its run is handed over, not ended
    there); its client picks it up on another instance from its cursor, and gets the end there."""
    a = fleet(GATEWAY_SHUTDOWN__GRACE_SECONDS="60")
    b = fleet()
    async with sdk_for(a.url) as client_a, sdk_for(b.url) as client_b:
        seen, exit_seconds = await stream_until_signalled_twice(client_a, a, signal.SIGINT)
        assert exit_seconds < 5
        assert seen[-1].type not in TERMINAL
        assert isinstance(seen[0], ResponseCreatedEvent)
        resumed = await client_b.responses.retrieve(
            seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number
        )
        rest = [event async for event in resumed]
    assert "handing" in a.log()
    assert_clean_sequence(numbered(seen + rest))
    assert rest[-1].type == "response.failed"  # output had started: another instance cannot go on with it


async def test_a_second_sigterm_hands_runs_over_at_once_on_redis(fleet: Callable[..., GatewayProcess]) -> None:
    a = fleet(GATEWAY_SHUTDOWN__GRACE_SECONDS="60")
    b = fleet()
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        created = await client_a.responses.create(
            model="sim-1", input="handed over", background=True, metadata={"sim_ttft_ms": "8000", "sim_tokens": "5"}
        )
        assert await signal_twice(a) < 5  # neither the 60 s grace nor the 8 s the run takes

        async def completed() -> bool:
            return (await client_b.responses.retrieve(created.id)).status == "completed"

        await eventually(completed, within=30)  # no output yet when handed over: B runs it again from the start
        assert "handing" in a.log()
    finally:
        await client_a.close()
        await client_b.close()


async def test_capacity_queues_background_runs_and_refuses_synchronous_ones(
    simulator_url: str, storage_url: str, key_prefix: str
) -> None:
    """Done-when: `max_concurrent: 2` and 5 background requests → 3 `queued`, then all 5 complete."""
    settings = load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix},
        upstreams=[{"name": "sim", "base_url": f"{simulator_url}/v1"}],
        runs={"max_concurrent": 2, "sweep_seconds": 0.2, "renew_seconds": 0.5, "lease_seconds": 5},
    )
    async with serve_gateway(settings) as gateway:
        created = [
            await gateway.client.responses.create(
                model="sim-1", input=f"job {n}", background=True, metadata={"sim_token_delay_ms": "30"}
            )
            for n in range(5)
        ]
        statuses = [response.status for response in created]
        assert statuses.count("queued") >= 3
        with pytest.raises(openai.RateLimitError) as refused:
            await gateway.client.responses.create(model="sim-1", input="sync while full")
        assert refused.value.response.headers["Retry-After"] == "1"
        first_events = await stream_frames(gateway.url, created[4].id)
        assert [f.event for f in first_events[:3]] == ["response.created", "response.queued", "response.in_progress"]

        async def all_completed() -> bool:
            results = [await gateway.client.responses.retrieve(r.id) for r in created]
            return all(result.status == "completed" for result in results)

        await eventually(all_completed, within=30)
        for n, response in enumerate(created):
            assert (await gateway.client.responses.retrieve(response.id)).output_text == expected_text(f"job {n}")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A redis-server of this test's own, with AOF on disk, that the test may kill and restart."""
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    directory = tmp_path / "redis"
    directory.mkdir()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes",
               "--appendfsync", "everysec", "--save", ""]  # fmt: skip
    state: dict[str, Any] = {"url": f"redis://127.0.0.1:{port}/0"}

    def start() -> None:
        state["process"] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, state["process"])

    state["start"] = start
    start()
    yield state
    stop_process(state["process"])


async def test_redis_down_at_start_is_said_once_and_served_once_it_is_up(
    own_redis: dict[str, Any], start_gateway_process: Callable[..., GatewayProcess]
) -> None:
    """Not fatal: Redis may come up after the gateway (one `compose up`). Until it does, /readyz is 503."""
    stop_process(own_redis["process"])
    gateway = start_gateway_process({"GATEWAY_STORAGE__URL": own_redis["url"]})
    async with aiohttp.ClientSession(gateway.url) as http, sdk_for(gateway.url) as client:
        async with http.get("/readyz") as ready, http.get("/healthz") as alive:
            assert (ready.status, alive.status) == (503, 200)
        assert f"storage: {own_redis['url']} does not answer" in gateway.log()
        own_redis["start"]()

        async def ready() -> bool:
            async with http.get("/readyz") as reply:
                return reply.status == 200

        await eventually(ready, within=15)
        assert (await client.responses.create(model="sim-1", input="redis is up")).status == "completed"


async def test_redis_killed_and_restarted_mid_run(
    own_redis: dict[str, Any], start_gateway_process: Callable[..., GatewayProcess], simulator_url: str
) -> None:
    gateway = start_gateway_process(redis_gateway_env(own_redis["url"], simulator_url, "outage"))
    client = sdk_for(gateway.url)
    try:
        created = await client.responses.create(
            model="sim-1",
            input="through an outage",
            background=True,
            metadata={"sim_token_delay_ms": "60", "sim_tokens": "40"},
        )
        await wait_for_output(client, created.id)
        await asyncio.sleep(0.5)
        own_redis["process"].send_signal(signal.SIGKILL)
        own_redis["process"].wait()
        async with aiohttp.ClientSession() as http:

            async def not_ready() -> bool:
                async with http.get(f"{gateway.url}/readyz") as reply:
                    return reply.status == 503

            await eventually(not_ready, within=10)
            await asyncio.sleep(1.0)
            own_redis["start"]()

            async def ready() -> bool:
                async with http.get(f"{gateway.url}/readyz") as reply:
                    return reply.status == 200

            await eventually(ready, within=15)

        async def ended() -> str | None:
            status = (await client.responses.retrieve(created.id)).status
            return status if status in ("completed", "failed") else None

        status = await eventually(ended, within=40)
        frames = await stream_frames(gateway.url, created.id)
        assert_clean_log(frames)
        if status == "completed":
            text = "".join(f.data["delta"] for f in frames if f.event == "response.output_text.delta")  # type: ignore[index]
            assert text == expected_text("through an outage", tokens=40)
    finally:
        await client.close()
