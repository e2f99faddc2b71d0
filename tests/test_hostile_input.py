"""Hostile input, tried as an attacker with a valid key would: no tenant can slow or break another tenant's
service, and no input gets anything but a 4xx in the OpenAI envelope."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest

from gateway.config import load_settings
from tests.conftest import Gateway, GatewayProcess, eventually, redis_gateway_env, serve_gateway
from tests.helpers import keys_with_prefix, sim_stats, upstream_calls

KEY_A = "sk-hostile-a-0123456789abcdef"
KEY_B = "sk-hostile-b-fedcba9876543210"
POISONED_CURSORS = [
    {"params": {"starting_after": "18446744073709551616"}},  # past a stream id's 64 bits
    {"params": {"starting_after": "9" * 5000}},
    {"params": {"starting_after": "+5"}},
    {"params": {"starting_after": "1_0"}},
    {"params": {"starting_after": "\u0663"}},  # a digit to int(), not to a stream id
    {"headers": {"Last-Event-ID": "\u00b2"}},
    {"headers": {"Last-Event-ID": "9" * 5000}},
]


def two_tenant_settings(redis_url: str, simulator_url: str, key_prefix: str, **extra: Any) -> Any:
    keys = [
        {"tenant": tenant, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        for tenant, key in (("a", KEY_A), ("b", KEY_B))
    ]
    upstreams = extra.pop("upstreams", [{"name": "sim", "base_url": f"{simulator_url}/v1"}])
    return load_settings(
        storage={"url": redis_url, "key_prefix": key_prefix},
        upstreams=[{"max_retries": 0, **upstream} for upstream in upstreams],
        auth={"enabled": True, "keys": keys},
        **extra,
    )


@pytest.fixture
async def owner_and_reader(
    redis_server: str, simulator_url: str, key_prefix: str
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two instances on one Redis: responses run on the first; the second serves their streams through its one
    shared feed read, the path a poisoned cursor once broke for every stream of the instance."""
    settings = two_tenant_settings(redis_server, simulator_url, key_prefix, sse={"heartbeat_seconds": 5})
    async with serve_gateway(settings) as owner, serve_gateway(settings) as reader:
        yield owner, reader


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


async def test_a_poisoned_cursor_is_refused_and_another_tenants_stream_keeps_the_models_pace(
    owner_and_reader: tuple[Gateway, Gateway], key_prefix: str
) -> None:
    owner, reader = owner_and_reader
    pace = {"sim_tag": key_prefix, "sim_tokens": "60", "sim_token_delay_ms": "20"}
    a_owner, b_owner, a_reader, b_reader = (
        sdk(owner, KEY_A),
        sdk(owner, KEY_B),
        sdk(reader, KEY_A),
        sdk(reader, KEY_B),
    )
    try:
        theirs = await b_owner.responses.create(model="sim-1", input="b", background=True, metadata=pace)
        mine = await a_owner.responses.create(model="sim-1", input="a", background=True, metadata=pace)
        arrivals: list[float] = []

        async def tenant_b_streams() -> None:
            stream = await b_reader.responses.retrieve(theirs.id, stream=True)
            async for event in stream:
                arrivals.append(time.monotonic())
                if event.type == "response.completed":
                    return

        async def tenant_a_attacks() -> list[tuple[int, dict[str, Any]]]:
            # A legitimate follower of A's own response keeps its watch alive meanwhile.
            follower = asyncio.ensure_future(_drain(await a_reader.responses.retrieve(mine.id, stream=True)))
            refused = []
            held = []  # a poisoned stream that was let in stays open, as the attacker would keep it
            for _ in range(3):
                for attempt in POISONED_CURSORS:
                    headers = {"Authorization": f"Bearer {KEY_A}", **attempt.get("headers", {})}
                    params = {"stream": "true", **attempt.get("params", {})}
                    reply = await reader.http.get(f"/v1/responses/{mine.id}", params=params, headers=headers)
                    if reply.status == 200:
                        held.append(asyncio.ensure_future(reply.read()))
                        refused.append((reply.status, {}))
                        continue
                    refused.append((reply.status, await reply.json()))
                    reply.release()
                await asyncio.sleep(0.2)
            await follower
            await asyncio.gather(*held)
            return refused

        refused, _ = await asyncio.gather(tenant_a_attacks(), tenant_b_streams())
    finally:
        for client in (a_owner, b_owner, a_reader, b_reader):
            await client.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(arrivals) > 60
    # At the model's pace (20 ms a token); a broken shared read would leave B waiting a heartbeat (5 s) at a time.
    assert max(gaps) < 2.0, max(gaps)
    for status, body in refused:
        assert status == 400, body
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] in ("starting_after", "Last-Event-ID")


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def _peak(simulator_url: str, tag: str) -> int:
    return int((await sim_stats(simulator_url))["peak_active_by_tag"].get(tag, 0))


async def test_a_burst_of_40_never_runs_more_than_max_concurrent_upstream_calls(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    settings = two_tenant_settings(redis_server, simulator_url, key_prefix, runs={"max_concurrent": 8})
    pace = {"sim_tag": key_prefix, "sim_tokens": "8", "sim_token_delay_ms": "20"}
    async with serve_gateway(settings) as gateway:
        client = sdk(gateway, KEY_A)
        try:
            created = await asyncio.gather(
                *(
                    client.responses.create(model="sim-1", input=f"burst {i}", background=True, metadata=pace)
                    for i in range(40)
                )
            )

            async def all_completed() -> bool:
                statuses = [(await client.responses.retrieve(r.id)).status for r in created]
                return statuses == ["completed"] * 40

            await eventually(all_completed, within=30, interval=0.2)
        finally:
            await client.close()
    assert await upstream_calls(simulator_url, key_prefix) == 40
    assert await _peak(simulator_url, key_prefix) == 8


async def test_a_keys_queued_runs_start_within_its_limit_and_do_not_hold_up_others(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """Queued responses start without their key: they still count against its tenant, and one tenant's queue
    beyond its limit does not keep another tenant's queued responses waiting."""
    keys = [
        {"tenant": "a", "key_sha256": hashlib.sha256(KEY_A.encode()).hexdigest(), "max_concurrent_runs": 2},
        {"tenant": "b", "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest()},
    ]
    settings = load_settings(
        storage={"url": redis_server, "key_prefix": key_prefix},
        upstreams=[{"name": "sim", "base_url": f"{simulator_url}/v1", "max_retries": 0}],
        auth={"enabled": True, "keys": keys},
        runs={"max_concurrent": 4, "sweep_seconds": 0.1},
    )
    a_tag, b_tag = f"{key_prefix}-a", f"{key_prefix}-b"
    async with serve_gateway(settings) as gateway:
        a, b = sdk(gateway, KEY_A), sdk(gateway, KEY_B)
        try:
            # Long enough that every create below is admitted while the fill holds all four slots (at 10 tokens
            # a loaded CI machine saw the fill end first: A's first two started, and its third create was a 429).
            slow_b = {"sim_tag": f"{b_tag}-fill", "sim_tokens": "40", "sim_token_delay_ms": "30"}
            filling = [
                await b.responses.create(model="sim-1", input="fill", background=True, metadata=slow_b)
                for _ in range(4)
            ]
            a_pace = {"sim_tag": a_tag, "sim_tokens": "10", "sim_token_delay_ms": "30"}
            queued_a = [
                await a.responses.create(model="sim-1", input=f"a {i}", background=True, metadata=a_pace)
                for i in range(6)
            ]
            b_pace = {"sim_tag": b_tag, "sim_tokens": "10", "sim_token_delay_ms": "30"}
            queued_b = [
                await b.responses.create(model="sim-1", input=f"b {i}", background=True, metadata=b_pace)
                for i in range(2)
            ]

            async def b_started() -> bool:
                return await upstream_calls(simulator_url, b_tag) == 2

            # B's queued responses, behind all of A's, start as soon as the fill ends: A at its limit holds 2 slots.
            await eventually(b_started, within=10, interval=0.05)
            assert await upstream_calls(simulator_url, a_tag) < 6

            async def all_completed() -> bool:
                responses = [*filling, *queued_a, *queued_b]
                statuses = [(await b.responses.retrieve(r.id)).status for r in [*filling, *queued_b]]
                statuses += [(await a.responses.retrieve(r.id)).status for r in queued_a]
                return statuses == ["completed"] * len(responses)

            await eventually(all_completed, within=30, interval=0.2)
        finally:
            await a.close()
            await b.close()
    assert await upstream_calls(simulator_url, a_tag) == 6
    assert await _peak(simulator_url, a_tag) == 2


async def test_history_beyond_the_bounds_is_a_400_naming_its_parameter_and_nothing_is_sent_or_stored(
    redis_server: str, simulator_url: str, key_prefix: str, redis_client: Any
) -> None:
    """A few small requests continuing a huge history must not each send it all upstream again."""
    limits = {"max_history_bytes": 150_000, "max_history_items": 50, "max_chain_length": 4}
    settings = two_tenant_settings(redis_server, simulator_url, key_prefix, limits=limits)
    tag = {"sim_tag": key_prefix, "sim_tokens": "2", "sim_token_delay_ms": "0"}
    big = "x" * 80_000
    async with serve_gateway(settings) as gateway:
        client = sdk(gateway, KEY_A)
        try:
            first = await client.responses.create(model="sim-1", input=big, metadata=tag)
            second = await client.responses.create(
                model="sim-1", input=big, previous_response_id=first.id, metadata=tag
            )
            keys_before = len(await keys_with_prefix(redis_client, key_prefix))
            calls_before = await upstream_calls(simulator_url, key_prefix)
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="sim-1", input="hi", previous_response_id=second.id, metadata=tag)
            assert (refused.value.code, refused.value.param) == ("history_too_large", "previous_response_id")
            # Many items, each small: the item bound.
            conversation = await client.conversations.create(
                items=[{"type": "message", "role": "user", "content": f"item {i}"} for i in range(20)]
            )
            await client.conversations.items.create(
                conversation.id,
                items=[{"type": "message", "role": "user", "content": f"more {i}"} for i in range(20)],
            )
            await client.conversations.items.create(
                conversation.id,
                items=[{"type": "message", "role": "user", "content": f"last {i}"} for i in range(20)],
            )
            keys_before = len(await keys_with_prefix(redis_client, key_prefix))
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="sim-1", input="hi", conversation=conversation.id, metadata=tag)
            assert (refused.value.code, refused.value.param) == ("history_too_large", "conversation")
            assert await upstream_calls(simulator_url, key_prefix) == calls_before
            assert len(await keys_with_prefix(redis_client, key_prefix)) == keys_before
            # The chain length: small links; 4 are followed, not 5.
            link = await client.responses.create(model="sim-1", input="a", metadata=tag)
            for _ in range(4):
                link = await client.responses.create(
                    model="sim-1", input="b", previous_response_id=link.id, metadata=tag
                )
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="sim-1", input="c", previous_response_id=link.id, metadata=tag)
            assert (refused.value.code, refused.value.param) == ("history_too_large", "previous_response_id")
        finally:
            await client.close()


async def test_a_synchronous_request_the_provider_refuses_names_the_response_it_stored(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    settings = two_tenant_settings(redis_server, simulator_url, key_prefix)
    async with serve_gateway(settings) as gateway:
        client = sdk(gateway, KEY_A)
        try:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(
                    model="sim-1", input="hi", metadata={"sim_tag": key_prefix, "sim_fault": "http_400"}
                )
            response_id = refused.value.response.headers["x-response-id"]
            stored = await client.responses.retrieve(response_id)
            assert stored.status == "failed"
            with pytest.raises(openai.InternalServerError) as failed:  # a provider's 5xx: a 502 naming it too
                await client.responses.create(
                    model="sim-1", input="hi", metadata={"sim_tag": key_prefix, "sim_fault": "http_500"}
                )
            assert (await client.responses.retrieve(failed.value.response.headers["x-response-id"])).status == "failed"
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (b'{"model":"sim-1","input":"hi"}', {"Content-Encoding": "gzip"}, "invalid_body"),
        (b'{"model":"sim-1","input":' + b"[" * 65 + b"]" * 65 + b"}", {}, "invalid_json"),
        (b'{"model":"sim-1","input":"hi","metadata":' + b'{"a":' * 300 + b"1" + b"}" * 301, {}, "invalid_json"),
    ],
)
async def test_a_body_that_cannot_be_read_or_nests_too_deep_is_a_400(
    redis_server: str, simulator_url: str, key_prefix: str, body: bytes, headers: dict[str, str], code: str
) -> None:
    settings = two_tenant_settings(redis_server, simulator_url, key_prefix)
    async with serve_gateway(settings) as gateway:
        for path in ("/v1/responses", "/v1/conversations", "/v1/responses/input_tokens"):
            request_headers = {
                "Authorization": f"Bearer {KEY_A}",
                "Content-Type": "application/json",
                "Connection": "close",  # a body it could not read leaves the connection unusable
                **headers,
            }
            async with gateway.http.post(path, data=body, headers=request_headers) as reply:
                assert reply.status == 400, path
                error = (await reply.json())["error"]
            assert error["code"] == code
            assert set(error) == {"message", "type", "param", "code"}


def _exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.settimeout(wait)
        connection.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := connection.recv(65536):
                received += chunk
        return received


def _closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes `connection` (reads end) within `seconds`."""
    connection.settimeout(seconds)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def guarded_gateway(
    start_gateway_process: Callable[..., GatewayProcess], redis_server: str, simulator_url: str, key_prefix: str
) -> GatewayProcess:
    """A real gateway process (the connection handling is the server's, not the app's) with auth on and short
    connection bounds."""
    keys = [{"tenant": "a", "key_sha256": hashlib.sha256(KEY_A.encode()).hexdigest()}]
    env = redis_gateway_env(
        redis_server,
        simulator_url,
        key_prefix,
        GATEWAY_AUTH__ENABLED="true",
        GATEWAY_AUTH__KEYS=orjson.dumps(keys).decode(),
        GATEWAY_SERVER__IDLE_TIMEOUT_SECONDS="1",
        GATEWAY_SERVER__BODY_TIMEOUT_SECONDS="1",
        GATEWAY_SERVER__MIN_BODY_BYTES_PER_SECOND="10000000",  # so a 4 MB body has about 1.4 s
        GATEWAY_SERVER__MAX_CONNECTIONS_PER_IP="8",
    )
    return start_gateway_process(env)


@pytest.mark.parametrize(
    "header",
    [
        f"Authorization: Bearer {KEY_A}\x7f".encode(),  # a DEL byte after the key
        f"Authorization: Bearer {KEY_A}{' ' * 9000}".encode(),  # a line longer than the server reads
        f"Authorization: Bearer {KEY_A}\rX: y".encode(),  # a CR inside a header
        b"Content-Length: abc",
    ],
)
def test_a_request_that_is_not_valid_http_gets_the_envelope_and_nothing_it_sent_is_echoed_or_logged(
    guarded_gateway: GatewayProcess, header: bytes
) -> None:
    reply = _exchange(guarded_gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.")
    assert b" 400 " in head.split(b"\r\n")[0]
    assert b"application/json" in head
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_http_request"
    assert KEY_A.encode() not in reply
    log_text = guarded_gateway.log()
    assert KEY_A not in log_text
    assert "Traceback" not in log_text


def test_a_non_utf8_key_is_a_401_not_a_500(guarded_gateway: GatewayProcess) -> None:
    reply = _exchange(guarded_gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n")
    assert b" 401 " in reply.split(b"\r\n")[0]
    assert orjson.loads(reply.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"


def test_idle_slow_and_half_sent_requests_do_not_hold_a_connection(guarded_gateway: GatewayProcess) -> None:
    port = guarded_gateway.port
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert _closed_within(idle, 5)  # never sent anything
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET /v1/models HTTP/1.1\r\n")
        for _ in range(6):  # a header byte now and then: the headers never finish
            time.sleep(0.25)
            with contextlib.suppress(OSError):
                slow.sendall(b"X")
        assert _closed_within(slow, 5)
    body = b'{"model":"sim-1","input":"' + b"x" * 1000
    half = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY_A}\r\nContent-Length: 4000000\r\n\r\n".encode()
        + body
    )
    reply = _exchange(port, half, wait=10)
    assert b" 408 " in reply.split(b"\r\n")[0]
    assert orjson.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_one_address_holds_only_so_many_connections(guarded_gateway: GatewayProcess) -> None:
    held = [socket.create_connection(("127.0.0.1", guarded_gateway.port)) for _ in range(8)]
    try:
        with socket.create_connection(("127.0.0.1", guarded_gateway.port)) as extra:
            assert _closed_within(extra, 2)
        held[0].close()
        time.sleep(0.2)
        reply = _exchange(guarded_gateway.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 200 " in reply.split(b"\r\n")[0]
    finally:
        for connection in held:
            connection.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"id": {"a": 1}},
        {"id": ["x"]},
        {"id": None},
        {"id": ""},
        {"id": "m" * 257},
        {"type": ["message"]},
        {"type": {"a": 1}},
        {"type": "t" * 65},
    ],
)
async def test_one_odd_input_item_is_a_400_and_the_conversation_goes_on(
    redis_server: str, simulator_url: str, key_prefix: str, bad: dict[str, Any]
) -> None:
    settings = two_tenant_settings(redis_server, simulator_url, key_prefix)
    tag = {"sim_tag": key_prefix, "sim_tokens": "2", "sim_token_delay_ms": "0"}
    item = {"type": "message", "role": "user", "content": "hi", **bad}
    async with serve_gateway(settings) as gateway:
        client = sdk(gateway, KEY_A)
        try:
            conversation = await client.conversations.create()
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="sim-1", input=[item], conversation=conversation.id, metadata=tag)
            assert refused.value.param in ("input[0].id", "input[0].type")
            with pytest.raises(openai.BadRequestError):
                await client.conversations.items.create(conversation.id, items=[item])
            turn = await client.responses.create(model="sim-1", input="hi", conversation=conversation.id, metadata=tag)
            assert turn.status == "completed"
            items = [entry async for entry in client.conversations.items.list(conversation.id)]
            assert len(items) == 2
        finally:
            await client.close()


async def test_a_burst_from_one_key_never_runs_more_than_its_limit(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    keys = [{"tenant": "a", "key_sha256": hashlib.sha256(KEY_A.encode()).hexdigest(), "max_concurrent_runs": 3}]
    settings = load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix},
        upstreams=[{"name": "sim", "base_url": f"{simulator_url}/v1", "max_retries": 0}],
        auth={"enabled": True, "keys": keys},
    )
    pace = {"sim_tag": key_prefix, "sim_tokens": "10", "sim_token_delay_ms": "20"}
    async with serve_gateway(settings) as gateway:
        client = sdk(gateway, KEY_A)
        try:
            outcomes = await asyncio.gather(
                *(client.responses.create(model="sim-1", input=f"b {i}", metadata=pace) for i in range(8)),
                return_exceptions=True,
            )
        finally:
            await client.close()
    completed = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, openai.RateLimitError)]
    assert (len(completed), len(refused)) == (3, 5)
    assert await _peak(simulator_url, key_prefix) == 3
