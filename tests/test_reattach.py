"""Reattach from any instance, cancel from anywhere, delete, input items, and many subscribers per response."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from openai.types.responses import Response
from redis.asyncio.cluster import RedisCluster

from tests.conftest import (
    Gateway,
    GatewayProcess,
    eventually,
    gateway_settings,
    serve_gateway,
)
from tests.helpers import Frame, expected_text, keys_with_prefix, read_frames, sdk_for, sim_stats


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def get_stream(
    http: aiohttp.ClientSession,
    url: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> list[Frame]:
    async with http.get(url, params={"stream": "true", **(params or {})}, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await read_frames(response)


def assert_contiguous(frames: list[Frame], first: int) -> None:
    assert [frame.number for frame in frames] == list(range(first, first + len(frames)))
    terminal = {"response.completed", "response.failed", "response.incomplete"}
    assert frames[-1].event in terminal
    assert sum(frame.event in terminal for frame in frames) == 1


async def test_disconnect_at_k_then_reattach_on_the_other_instance(
    two_gateways: tuple[GatewayProcess, GatewayProcess], http: aiohttp.ClientSession, key_prefix: str
) -> None:
    """Done-when: disconnect at event k, reattach on the other instance with `starting_after=k` and separately
    with `Last-Event-ID: k` → events k+1…end, contiguous, no duplicates, byte-identical to an uninterrupted
    subscriber's."""
    a, b = two_gateways
    k = 5
    body = {
        "model": "sim-1",
        "input": "reattach across instances",
        "background": True,
        "stream": True,
        "metadata": {"sim_token_delay_ms": "50", "sim_tag": key_prefix},
    }
    async with http.post(f"{a.url}/v1/responses", json=body) as response:
        head = await read_frames(response, limit=k + 1)
    # The connection is closed here, at event k; the run goes on.
    assert head[-1].id == f"{k}.1"  # `<sequence number>.<epoch>`: the lease epoch of its writer, the first
    response_id = head[0].data["response"]["id"]  # type: ignore[index]
    uninterrupted = asyncio.create_task(get_stream(http, f"{a.url}/v1/responses/{response_id}"))
    async with http.get(f"{b.url}/v1/responses/{response_id}") as snapshot:
        assert (await snapshot.json())["status"] == "in_progress"  # reattaching mid-run, not after the fact
    via_query, via_header = await asyncio.gather(
        get_stream(http, f"{b.url}/v1/responses/{response_id}", params={"starting_after": str(k)}),
        get_stream(http, f"{b.url}/v1/responses/{response_id}", headers={"Last-Event-ID": head[-1].id or ""}),
    )
    full = await uninterrupted
    assert_contiguous(full, 0)
    assert [frame.raw for frame in head] == [frame.raw for frame in full[: k + 1]]
    for resumed in (via_query, via_header):
        assert_contiguous(resumed, k + 1)
        assert [frame.raw for frame in resumed] == [frame.raw for frame in full[k + 1 :]]
    text = "".join(f.data["delta"] for f in full if f.event == "response.output_text.delta")  # type: ignore[index]
    assert text == expected_text("reattach across instances")


async def test_starting_after_wins_over_last_event_id(gateway: Gateway) -> None:
    created = await gateway.client.responses.create(model="sim-1", input="cursor precedence", background=True)

    async def completed() -> bool:
        return (await gateway.client.responses.retrieve(created.id)).status == "completed"

    await eventually(completed)
    async with gateway.http.get(
        f"/v1/responses/{created.id}", params={"stream": "true", "starting_after": "7"}, headers={"Last-Event-ID": "3"}
    ) as response:
        frames = await read_frames(response)
    assert frames[0].id == "8.1"


async def test_sdk_stream_by_id_on_a_finished_and_a_running_response(
    two_gateways: tuple[GatewayProcess, GatewayProcess],
) -> None:
    """Done-when: `client.responses.stream(response_id=id)` gives the same final response as the original
    stream, for a finished response and for one still running (attached on the other instance)."""
    a, b = two_gateways
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        async with client_a.responses.stream(model="sim-1", input="finished first", background=True) as original:
            finished = await original.get_final_response()
        async with client_b.responses.stream(response_id=finished.id) as again:
            assert (await again.get_final_response()).model_dump() == finished.model_dump()

        async with client_a.responses.stream(
            model="sim-1", input="still running", background=True, metadata={"sim_token_delay_ms": "40"}
        ) as original:
            created = await anext(aiter(original))
            response_id = created.response.id  # type: ignore[union-attr]
            async with client_b.responses.stream(response_id=response_id, starting_after=2) as attached:
                seen = [event.sequence_number async for event in attached]
                from_b = await attached.get_final_response()
            from_a = await original.get_final_response()
        assert seen[0] == 3
        assert from_b.model_dump() == from_a.model_dump()
        assert from_a.output_text == expected_text("still running")
    finally:
        await client_a.close()
        await client_b.close()


async def test_stream_after_the_end_is_an_empty_200_and_past_it_a_400(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="past the end", background=True)
    async with gateway.client.responses.stream(response_id=response.id) as stream:
        await stream.get_final_response()
    async with gateway.http.get(f"/v1/responses/{response.id}", params={"stream": "true"}) as full:
        frames = await read_frames(full)
    end = max(frames[-1].number, 0)
    async with gateway.http.get(
        f"/v1/responses/{response.id}", params={"stream": "true", "starting_after": str(end)}
    ) as empty:
        assert empty.status == 200
        assert await read_frames(empty) == []
    # Past the last stored event no client can have read (events are stored before they are sent) unless the
    # store lost them: told at once, changing nothing, in the SDK's own call as well as by header.
    with pytest.raises(openai.BadRequestError) as refused:
        await gateway.client.responses.retrieve(response.id, stream=True, starting_after=end + 100)
    assert refused.value.code == "cursor_past_last_event"
    assert refused.value.param == "starting_after"
    headers = {"Last-Event-ID": str(end + 1)}
    async with gateway.http.get(f"/v1/responses/{response.id}", params={"stream": "true"}, headers=headers) as past:
        assert past.status == 400
        error = (await past.json())["error"]
    assert (error["param"], error["code"], error["type"]) == (
        "Last-Event-ID",
        "cursor_past_last_event",
        "invalid_request_error",
    )
    assert (await gateway.client.responses.retrieve(response.id)).status == "completed"


@pytest.mark.parametrize(
    ("params", "headers", "param"),
    [
        ({"starting_after": "x"}, {}, "starting_after"),
        ({"starting_after": "-1"}, {}, "starting_after"),
        ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID"),
        ({}, {"Last-Event-ID": "3.x"}, "Last-Event-ID"),
        ({}, {"Last-Event-ID": "3.99999999999999999999999"}, "Last-Event-ID"),  # past a stream id's 64 bits
        ({}, {"Last-Event-ID": "\u00b2"}, "Last-Event-ID"),  # a digit to str.isdigit, not to int()
        ({"stream": "maybe"}, {}, "stream"),
        ({"include[]": "nonsense"}, {}, "include"),
    ],
)
async def test_bad_retrieve_parameters_are_400s(
    gateway: Gateway, params: dict[str, str], headers: dict[str, str], param: str
) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="params", background=True)
    async with gateway.http.get(
        f"/v1/responses/{response.id}", params={"stream": "true", **params}, headers=headers
    ) as reply:
        assert reply.status == 400
        assert (await reply.json())["error"]["param"] == param


async def test_retrieve_accepts_known_include_values(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="include")
    again = await gateway.client.responses.retrieve(response.id, include=["message.output_text.logprobs"])
    assert again.id == response.id


async def test_store_false_responses_cannot_be_streamed_by_get(gateway: Gateway) -> None:
    stream = await gateway.client.responses.create(
        model="sim-1", input="unstored", stream=True, store=False, metadata={"sim_token_delay_ms": "30"}
    )
    created = await anext(aiter(stream))
    async with gateway.http.get(
        f"/v1/responses/{created.response.id}",  # type: ignore[union-attr]
        params={"stream": "true"},
    ) as reply:
        assert reply.status == 404
    await stream.close()


async def test_heartbeats_keep_an_idle_stream_alive_and_the_sdk_reads_through_them(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    settings = gateway_settings(
        storage_url=storage_url, simulator_url=simulator_url, key_prefix=key_prefix, sse={"heartbeat_seconds": 0.05}
    )
    async with serve_gateway(settings) as gateway:
        response = await gateway.client.responses.create(
            model="sim-1", input="slow", background=True, metadata={"sim_token_delay_ms": "150", "sim_tokens": "4"}
        )
        async with gateway.http.get(f"/v1/responses/{response.id}", params={"stream": "true"}) as raw:
            body = await raw.read()
        assert body.startswith(b"retry: ")
        assert body.count(b": keep-alive\n") >= 3
        assert b": keep-alive\n\n" not in body  # a blank line after it would make the SDK see an empty event
        async with gateway.client.responses.stream(response_id=response.id) as stream:
            final = await stream.get_final_response()
        assert final.output_text == expected_text("slow", tokens=4)


async def test_cancel_on_one_instance_stops_the_run_on_the_other(
    two_gateways: tuple[GatewayProcess, GatewayProcess],
    http: aiohttp.ClientSession,
    simulator_url: str,
    key_prefix: str,
) -> None:
    """Done-when: cancel sent to instance B stops a run owned by instance A; the simulator sees its connection
    closed; the response ends `cancelled` with exactly one terminal event, which every subscriber gets."""
    a, b = two_gateways
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    try:
        created = await client_a.responses.create(
            model="sim-1",
            input="never ending",
            background=True,
            metadata={"sim_fault": "hang", "sim_tag": key_prefix},
        )

        async def upstream_streaming() -> bool:
            return (await sim_stats(simulator_url))["requests_by_tag"].get(key_prefix) == 1

        await eventually(upstream_streaming)
        subscriber_a = asyncio.create_task(get_stream(http, f"{a.url}/v1/responses/{created.id}"))
        subscriber_b = asyncio.create_task(get_stream(http, f"{b.url}/v1/responses/{created.id}"))
        await asyncio.sleep(0.2)
        cancelled = await client_b.responses.cancel(created.id)
        assert cancelled.status == "cancelled"

        async def upstream_closed() -> bool:
            return (await sim_stats(simulator_url))["disconnects_by_tag"].get(key_prefix) == 1

        # The owner closes the provider connection before it writes the terminal event, so by now the simulator
        # has seen it go (it polls its transport every 20 ms).
        await eventually(upstream_closed, within=1.0)
        for frames in await asyncio.gather(subscriber_a, subscriber_b):
            assert_contiguous(frames, 0)
            assert frames[-1].event == "response.failed"
            assert frames[-1].data["response"]["status"] == "cancelled"  # type: ignore[index]
        again = await client_a.responses.cancel(created.id)
        assert again.model_dump() == cancelled.model_dump()
        assert (await client_a.responses.retrieve(created.id)).status == "cancelled"
    finally:
        await client_a.close()
        await client_b.close()


async def test_cancel_rules(gateway: Gateway) -> None:
    completed = await gateway.client.responses.create(model="sim-1", input="done already", background=True)
    async with gateway.client.responses.stream(response_id=completed.id) as stream:
        await stream.get_final_response()
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a completed response"):
        await gateway.client.responses.cancel(completed.id)
    synchronous = await gateway.client.responses.create(model="sim-1", input="synchronous")
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        await gateway.client.responses.cancel(synchronous.id)
    with pytest.raises(openai.NotFoundError):
        await gateway.client.responses.cancel("resp_unknown")


async def test_cancel_of_a_queued_or_streaming_local_run(gateway: Gateway, simulator_url: str, key_prefix: str) -> None:
    stream = await gateway.client.responses.create(
        model="sim-1",
        input="cancel me",
        background=True,
        stream=True,
        metadata={"sim_token_delay_ms": "100", "sim_tag": key_prefix},
    )
    events = []
    cancelled: Response | None = None
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta" and cancelled is None:
            cancelled = await gateway.client.responses.cancel(events[0].response.id)  # type: ignore[union-attr]
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "cancelled"  # type: ignore[union-attr]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    partial = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert (await gateway.client.responses.retrieve(events[0].response.id)).output_text == partial  # type: ignore[union-attr]


async def test_delete(
    redis_gateway: Gateway, key_prefix: str, shared_redis_client: aioredis.Redis | RedisCluster
) -> None:
    running = await redis_gateway.client.responses.create(
        model="sim-1", input="still going", background=True, metadata={"sim_fault": "hang"}
    )
    with pytest.raises(openai.BadRequestError, match="in-flight"):
        await redis_gateway.client.responses.delete(running.id)
    assert (await redis_gateway.client.responses.retrieve(running.id)).status in ("queued", "in_progress")
    await redis_gateway.client.responses.cancel(running.id)

    finished = await redis_gateway.client.responses.create(model="sim-1", input="to delete")
    async with redis_gateway.http.delete(f"/v1/responses/{finished.id}") as reply:
        assert reply.status == 200
        assert await reply.json() == {"id": finished.id, "object": "response.deleted", "deleted": True}
    assert not any(finished.id.encode() in key for key in await keys_with_prefix(shared_redis_client, key_prefix))
    with pytest.raises(openai.NotFoundError):
        await redis_gateway.client.responses.retrieve(finished.id)
    with pytest.raises(openai.NotFoundError):
        await redis_gateway.client.responses.delete(finished.id)
    await redis_gateway.client.responses.delete(running.id)  # the SDK's own call, once it has ended
    assert await keys_with_prefix(shared_redis_client, key_prefix) == []


async def test_input_items_paginate_in_both_orders_with_stable_ids(gateway: Gateway) -> None:
    items: list[Any] = [{"role": "user", "content": f"message {n}"} for n in range(45)]
    response = await gateway.client.responses.create(model="sim-1", input=items)
    ascending = [item async for item in gateway.client.responses.input_items.list(response.id, limit=7, order="asc")]
    assert [item.content[0].text for item in ascending] == [f"message {n}" for n in range(45)]  # type: ignore[union-attr]
    descending = [item async for item in gateway.client.responses.input_items.list(response.id, limit=10)]
    assert [item.id for item in descending] == [item.id for item in reversed(ascending)]
    assert len({item.id for item in ascending}) == 45
    page = await gateway.client.responses.input_items.list(response.id, limit=20)
    assert page.has_more is True
    assert page.first_id == descending[0].id
    assert page.last_id == descending[19].id

    single = await gateway.client.responses.create(model="sim-1", input="just a string")
    listed = await gateway.client.responses.input_items.list(single.id)
    assert len(listed.data) == 1
    assert listed.data[0].type == "message"
    assert listed.data[0].content[0].text == "just a string"  # type: ignore[union-attr]
    assert listed.has_more is False


@pytest.mark.parametrize(
    ("params", "param"),
    [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"order": "up"}, "order"), ({"after": "x"}, "after")],
)
async def test_input_items_bad_parameters(gateway: Gateway, params: dict[str, str], param: str) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="params")
    async with gateway.http.get(f"/v1/responses/{response.id}/input_items", params=params) as reply:
        assert reply.status == 400
        assert (await reply.json())["error"]["param"] == param
    with pytest.raises(openai.NotFoundError):
        await gateway.client.responses.input_items.list("resp_unknown")


def stalled_subscriber(url: str, path: str) -> socket.socket:
    """A client that asks for the stream and then never reads: a tiny receive buffer fills at once."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path}?stream=true HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def drain(sock: socket.socket) -> bytes:
    """Everything the server sent before it closed the connection."""
    sock.settimeout(10)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


async def test_twenty_subscribers_one_stalled(
    storage_url: str, simulator_url: str, key_prefix: str, http: aiohttp.ClientSession
) -> None:
    """Done-when: 20 concurrent subscribers, one of which stops reading: the other 19 get complete streams, the
    stalled one is cut off with bounded memory, and the run finishes without waiting for it. The small live
    buffer makes healthy readers overflow now and then too: they fall back to the store and still get every
    event, exactly once."""
    settings = gateway_settings(
        storage_url=storage_url,
        simulator_url=simulator_url,
        key_prefix=key_prefix,
        sse={"subscriber_buffer_events": 64, "write_timeout_seconds": 0.5, "socket_send_buffer_bytes": 16384},
    )
    async with serve_gateway(settings) as gateway:
        created = await gateway.client.responses.create(
            model="sim-1",
            input="many subscribers",
            background=True,
            metadata={"sim_tokens": "3000", "sim_token_delay_ms": "1", "sim_ttft_ms": "300"},
        )
        path = f"/v1/responses/{created.id}"
        stalled = await asyncio.to_thread(stalled_subscriber, gateway.url, path)
        readers = [asyncio.create_task(get_stream(http, f"{gateway.url}{path}")) for _ in range(19)]

        async def finished() -> Response | None:
            current = await gateway.client.responses.retrieve(created.id)
            return current if current.status == "completed" else None

        # The run completes while the stalled client has still read nothing.
        done = await eventually(finished, within=60)
        streams = await asyncio.gather(*readers)
        for frames in streams:
            assert_contiguous(frames, 0)
            assert frames[-1].event == "response.completed"
        assert {len(frames) for frames in streams} == {len(streams[0])}
        assert done.output_text == expected_text("many subscribers", tokens=3000)

        received = await asyncio.to_thread(drain, stalled)
        assert received.startswith(b"HTTP/1.1 200")
        assert b"response.completed" not in received  # cut off, never handed a terminal event
        assert len(received) < len(b"".join(frame.raw for frame in streams[0]))
