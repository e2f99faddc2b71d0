"""WebSocket mode, driven by the openai SDK's own `responses.connect()` (async and sync): lanes, continuations
(store true and false), sockets that drop and resume on the other instance, and bad frames."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import Gateway, serve_gateway
from tests.helpers import sim_requests, sim_stats, stream_frames
from tests.tcp_proxy import TcpProxy
from tests.websocket_support import TERMINAL, knobs, settings_for, until_terminal


def numbers(events: list[Any]) -> list[int]:
    return [event.sequence_number for event in events]


async def test_a_create_on_a_socket_is_an_ordinary_stored_response(two_instances: tuple[Gateway, Gateway]) -> None:
    first, second = two_instances
    async with first.client.responses.connect() as connection:
        await connection.response.create(model="sim-1", input="hello socket", stream_id="main", metadata=knobs("c"))
        events = await until_terminal(connection)
    assert events[-1].type == "response.completed", events[-1]
    assert {event.stream_id for event in events} == {"main"}
    assert numbers(events) == list(range(len(events)))
    response_id = events[0].response.id
    # Reattachable over HTTP, on the other instance: the same events, the same response.
    replay = await stream_frames(second.url, response_id)
    assert [frame.event for frame in replay] == [event.type for event in events]
    stored = await second.client.responses.retrieve(response_id)
    assert stored.output_text == events[-1].response.output_text


async def test_the_sync_client_speaks_the_same_protocol(one_instance: Gateway) -> None:
    def run() -> list[Any]:
        client = openai.OpenAI(base_url=f"{one_instance.url}/v1", api_key="k", max_retries=0)
        with client, client.responses.connect() as connection:
            connection.response.create(model="sim-1", input="sync", metadata=knobs("sync"))
            events = []
            for event in connection:
                events.append(event)
                if event.type in TERMINAL or event.type == "error":
                    return events
        return []

    events = await asyncio.to_thread(run)
    assert events[-1].type == "response.completed"
    assert all(getattr(event, "stream_id", None) is None for event in events)  # the default lane echoes nothing


async def test_two_lanes_interleave_and_one_lane_runs_in_order(one_instance: Gateway) -> None:
    async with one_instance.client.responses.connect() as connection:
        await connection.response.create(model="sim-1", input="lane a", stream_id="a", metadata=knobs("l", tokens=12))
        await connection.response.create(model="sim-1", input="lane b", stream_id="b", metadata=knobs("l", tokens=12))
        await connection.response.create(model="sim-1", input="lane a again", stream_id="a", metadata=knobs("l"))
        events = await until_terminal(connection, responses=3)
    lanes = [event.stream_id for event in events]
    first_a_end = next(i for i, e in enumerate(events) if e.type == "response.completed" and e.stream_id == "a")
    assert "b" in lanes[:first_a_end], "lane b waited for lane a"
    created_a = [i for i, e in enumerate(events) if e.type == "response.created" and e.stream_id == "a"]
    assert len(created_a) == 2
    assert created_a[1] > first_a_end, "a lane's second create overlapped its first"


@pytest.fixture
async def instance_of_kind(
    redis_server: str, simulator_url: str, key_prefix: str, upstream_kind: str
) -> AsyncIterator[Gateway]:
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix, upstream_kind)) as served:
        served.extra["tag"] = key_prefix
        yield served


@pytest.mark.parametrize("store", [True, False])
async def test_a_continuation_on_the_socket(instance_of_kind: Gateway, simulator_url: str, store: bool) -> None:
    one_instance = instance_of_kind
    tag = one_instance.extra["tag"]
    async with one_instance.client.responses.connect() as connection:
        await connection.response.create(model="sim-1", input="first turn words", store=store, metadata=knobs(tag))
        first = (await until_terminal(connection))[-1]
        assert first.type == "response.completed", first
        await connection.response.create(
            model="sim-1",
            input="second turn",
            store=store,
            previous_response_id=first.response.id,
            metadata=knobs(tag),
        )
        second = (await until_terminal(connection))[-1]
    assert second.type == "response.completed", second
    sent = await sim_requests(simulator_url, tag)
    history = orjson.dumps(sent[-1].get("input") or sent[-1]["messages"]).decode()  # Responses, or Chat
    assert "first turn words" in history
    assert first.response.output_text in history
    assert "second turn" in history
    if store:
        return
    # A store=false response lives in its socket's memory only: another socket cannot continue it.
    # A bad item continuing it is refused like any (before the socket's memory is read).
    async with one_instance.client.responses.connect() as connection:
        await connection.response.create(model="sim-1", input="one", store=False, metadata=knobs(tag))
        kept = (await until_terminal(connection))[-1]
        await connection.send_raw(
            orjson.dumps(
                {
                    "type": "response.create",
                    "model": "sim-1",
                    "store": False,
                    "previous_response_id": kept.response.id,
                    "input": [{"type": ["not", "a", "type"], "role": "user", "content": "x"}],
                }
            )
        )
        refused = (await until_terminal(connection))[-1]
    assert refused.type == "error", refused
    assert refused.status == 400, refused
    async with one_instance.client.responses.connect() as connection:
        await connection.response.create(
            model="sim-1", input="again", store=False, previous_response_id=first.response.id
        )
        error = (await until_terminal(connection))[-1]
    assert error.type == "error", error
    assert error.error.code == "previous_response_not_found", error


async def test_a_dropped_socket_resumes_on_the_other_instance(two_instances: tuple[Gateway, Gateway]) -> None:
    first, second = two_instances
    seen: list[Any] = []
    async with first.client.responses.connect() as connection:
        await connection.response.create(
            model="sim-1", input="long answer", stream_id="work", metadata=knobs("drop", tokens=40, delay_ms=15)
        )
        async for event in connection:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) > 8:
                break
        connection._connection.transport.abort()  # the network drops: no close frame
    response_id = seen[0].response.id
    async with second.client.responses.connect(
        extra_query={"resume": f"{response_id}:{seen[-1].sequence_number}"}
    ) as connection:
        rest = await until_terminal(connection)
    assert rest[-1].type == "response.completed"
    assert numbers(seen + rest) == list(range(len(seen) + len(rest))), "an event missed or repeated"
    assert {event.stream_id for event in rest} == {"work"}, "a resumed response stays on its lane"
    text = "".join(event.delta for event in seen + rest if event.type == "response.output_text.delta")
    assert text == rest[-1].response.output_text


async def test_the_sdk_reconnect_hook_resumes_through_a_balancer(two_instances: tuple[Gateway, Gateway]) -> None:
    first, second = two_instances
    balancer = TcpProxy("127.0.0.1", int(first.url.rsplit(":", 1)[1]))
    await balancer.start()
    progress: dict[str, Any] = {}

    def on_reconnecting(event: Any) -> Any:
        # The client names what it has; the new socket, on whichever instance, goes on from there.
        return {"extra_query": {"resume": f"{progress['id']}:{progress['seq']}"}}

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{balancer.port}/v1", api_key="k", max_retries=0)
    events: list[Any] = []
    try:
        async with client.responses.connect(on_reconnecting=on_reconnecting, initial_delay=0.05) as connection:
            await connection.response.create(
                model="sim-1", input="through a balancer", metadata=knobs("lb", tokens=40, delay_ms=15)
            )
            async with asyncio.timeout(20):
                async for event in connection:
                    events.append(event)
                    progress.update(id=events[0].response.id, seq=event.sequence_number)
                    if len(events) == 8:
                        balancer.target_port = int(second.url.rsplit(":", 1)[1])
                        balancer.reset_all()  # the instance behind it "dies" for this client
                    if event.type in TERMINAL:
                        break
    finally:
        await client.close()
        await balancer.close()
    assert events[-1].type == "response.completed"
    assert numbers(events) == list(range(len(events)))


async def test_closing_the_socket_ends_only_unstored_runs(one_instance: Gateway, simulator_url: str) -> None:
    tag = one_instance.extra["tag"]
    async with one_instance.client.responses.connect() as connection:
        await connection.response.create(
            model="sim-1", input="kept", store=True, stream_id="kept", metadata=knobs(tag, tokens=30)
        )
        await connection.response.create(
            model="sim-1", input="dropped", store=False, stream_id="gone", metadata=knobs(tag, tokens=300)
        )
        kept_id = None
        async for event in connection:
            if event.type == "response.created" and event.stream_id == "kept":
                kept_id = event.response.id
            if event.type == "response.output_text.delta" and kept_id is not None:
                break
    assert kept_id is not None
    for _ in range(200):
        if (await sim_stats(simulator_url))["disconnects_by_tag"].get(tag):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the store=false run was not ended with its socket")
    for _ in range(200):
        kept = await one_instance.client.responses.retrieve(kept_id)
        if kept.status == "completed":
            break
        await asyncio.sleep(0.05)
    assert kept.status == "completed", "a stored run ended with its socket"


async def test_bad_frames_get_error_events_and_the_socket_stays_open(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    settings = settings_for(
        redis_server, simulator_url, key_prefix, websocket={"max_message_bytes": 4096, "max_sockets_per_key": 1}
    )
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as http:
        plain = await http.get(f"{gateway.url}/v1/responses")
        assert plain.status == 405
        assert (await plain.json())["error"]["code"] == "method_not_allowed"
        async with http.ws_connect(f"{gateway.url}/v1/responses") as socket:
            refused = await http.get(
                f"{gateway.url}/v1/responses", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
            )
            assert refused.status == 429, "a second socket for the key is over max_sockets_per_key"
            frames: list[tuple[str, dict[str, Any]]] = [
                ("not json", {"code": "invalid_json"}),
                ('{"type": "response.nope"}', {"code": "unknown_event_type", "param": "type"}),
                ("[1, 2]", {"param": "type"}),
                (
                    '{"type": "response.create", "model": "sim-1", "input": "x", "stream_id": ""}',
                    {"code": "invalid_stream_id"},
                ),
                (
                    '{"type": "response.create", "model": "sim-1", "input": "x", "background": true}',
                    {"param": "background"},
                ),
                ('{"type": "response.create", "input": "no model"}', {"param": "model"}),
                ('{"type": "response.resume", "response_id": "resp_nope"}', {"param": "response_id"}),
                (  # nested past what any later step could serialise: refused as it is parsed
                    '{"type": "response.create", "model": "sim-1", "input": "x", "metadata": '
                    + '{"a":' * 70
                    + "1"
                    + "}" * 71,
                    {"code": "invalid_json"},
                ),
            ]
            for frame, expected in frames:
                await socket.send_str(frame)
                reply = orjson.loads((await socket.receive(timeout=10)).data)
                assert reply["type"] == "error", (frame, reply)
                assert {key: reply["error"][key] for key in expected} == expected, (frame, reply)
                assert reply["status"] in (400, 404)
            await socket.send_str(orjson.dumps({"type": "response.create", "model": "sim-1", "input": "ok"}).decode())
            kinds = []
            while not kinds or kinds[-1] not in TERMINAL:
                kinds.append(orjson.loads((await socket.receive(timeout=10)).data)["type"])
            assert kinds[-1] == "response.completed"
            await socket.send_str("x" * 5000)  # over max_message_bytes
            closing = await socket.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert socket.close_code == 1009


async def test_a_stream_id_limit_per_socket(redis_server: str, simulator_url: str, key_prefix: str) -> None:
    settings = settings_for(redis_server, simulator_url, key_prefix, websocket={"max_stream_ids_per_socket": 2})
    async with serve_gateway(settings) as gateway, gateway.client.responses.connect() as connection:
        for lane in ("x", "y", "z"):
            await connection.response.create(model="sim-1", input=lane, stream_id=lane, metadata=knobs("limit"))
        events = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                async for event in connection:
                    events.append(event)
                    if sum(e.type in TERMINAL for e in events) == 2 and any(e.type == "error" for e in events):
                        break
    errors = [event for event in events if event.type == "error"]
    assert [error.error.code for error in errors] == ["websocket_stream_limit_reached"]
    assert errors[0].stream_id == "z"


async def test_an_idle_socket_is_closed(redis_server: str, simulator_url: str, key_prefix: str) -> None:
    settings = settings_for(redis_server, simulator_url, key_prefix, websocket={"idle_timeout_seconds": 0.3})
    async with (
        serve_gateway(settings) as gateway,
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{gateway.url}/v1/responses") as socket,
    ):
        closing = await socket.receive(timeout=10)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert socket.close_code == 1000


async def test_lanes_survive_repeated_socket_drops(redis_server: str, simulator_url: str, key_prefix: str) -> None:
    """A bounded chaos run: six lanes with a response each, while the socket is dropped (TCP abort, no close
    frame) every 15 events and reopened on the other instance with a `resume` for every response not ended.
    Every response's events arrive exactly once, in order, on its own lane."""
    settings = settings_for(redis_server, simulator_url, key_prefix)
    async with serve_gateway(settings) as first, serve_gateway(settings) as second:
        gateways = [first, second]
        received: dict[str, list[int]] = {}  # response id -> sequence numbers received, in order
        response_of: dict[str, str] = {}  # lane -> its response
        ended: set[str] = set()
        sockets = 0

        async def one_socket(resume: list[str], create: bool, drop_after: int | None) -> None:
            nonlocal sockets
            gateway = gateways[sockets % 2]
            sockets += 1
            query = {"resume": ",".join(resume)} if resume else {}
            async with gateway.client.responses.connect(extra_query=query) as connection:
                if create:
                    for lane in "abcdef":
                        await connection.response.create(
                            model="sim-1", input=lane, stream_id=lane, metadata=knobs(key_prefix, tokens=12, delay_ms=8)
                        )
                seen = 0
                async with asyncio.timeout(30):
                    async for event in connection:
                        if event.type == "response.created":
                            response_of.setdefault(event.stream_id, event.response.id)
                        response_id = response_of[event.stream_id]
                        received.setdefault(response_id, []).append(event.sequence_number)
                        if event.type in TERMINAL:
                            ended.add(response_id)
                            if len(ended) == 6:
                                return
                        seen += 1
                        if drop_after is not None and seen >= drop_after and len(response_of) == 6:
                            connection._connection.transport.abort()
                            return

        await one_socket([], create=True, drop_after=15)
        drops = 0
        while len(ended) < 6 and drops < 8:
            drops += 1
            resume = [f"{rid}:{numbers[-1]}" for rid, numbers in received.items() if rid not in ended]
            await one_socket(resume, create=False, drop_after=15 if drops < 4 else None)
    assert len(ended) == 6, f"{len(ended)} of 6 responses ended after {drops} drops"
    assert drops >= 3
    for response_id, numbers in received.items():
        assert numbers == list(range(len(numbers))), f"{response_id}: {numbers}"
