"""End to end: the official openai client against an in-process gateway in front of the simulator process."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from redis.asyncio.cluster import RedisCluster

from gateway.state import STORE
from runs.snapshot import apply_event
from tests.conftest import Gateway, eventually
from tests.helpers import expected_text, keys_with_prefix, read_frames, sim_stats, upstream_calls

EVENT_MODEL: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


async def stored_snapshot_and_replay(gateway: Gateway, response_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored snapshot, and the snapshot obtained by replaying the stored events from nothing."""
    assert gateway.app is not None
    store = gateway.app[STORE]
    record = await store.get_response(response_id)
    assert record is not None
    replayed: dict[str, Any] = {}
    # The run may append between the two reads: replay exactly the events the snapshot was written with.
    for event in await store.read_events(response_id, -1, limit=record.last_sequence_number + 1):
        replayed = apply_event(replayed, orjson.loads(event.data))
    return orjson.loads(record.snapshot), replayed


async def test_non_streaming_create_completes_with_the_model_text(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="Tell me about rivers.")
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert len(response.id) == len("resp_") + 32
    assert response.output_text == expected_text("Tell me about rivers.")
    assert response.usage is not None
    assert response.usage.output_tokens == 20
    assert response.completed_at is not None
    again = await gateway.client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()


async def test_streaming_create_sends_ordered_contiguous_events_that_accumulate(gateway: Gateway) -> None:
    events = []
    async with gateway.client.responses.stream(model="sim-1", input="stream me") as stream:
        async for event in stream:
            events.append(event)
        final = await stream.get_final_response()
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(events)))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == expected_text("stream me")
    assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}
    stored = await gateway.client.responses.retrieve(final.id)
    assert stored.status == "completed"
    assert stored.output_text == final.output_text


async def test_raw_sse_frames_carry_event_id_and_sdk_valid_json(gateway: Gateway) -> None:
    body = {"model": "sim-1", "input": "raw frames", "stream": True}
    async with gateway.http.post("/v1/responses", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        frames = await read_frames(response)
    for number, frame in enumerate(frames):
        assert frame.data is not None
        assert frame.event == frame.data["type"]
        assert frame.id == f"{number}.1" == f"{frame.data['sequence_number']}.1"  # `<sequence number>.<epoch>`
        EVENT_MODEL.validate_python(frame.data)
    assert frames[-1].event == "response.completed"
    Response.model_validate(frames[-1].data["response"])  # type: ignore[index]


async def test_background_create_returns_at_once_and_completes_later(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(
        model="sim-1", input="background please", background=True, metadata={"sim_token_delay_ms": "20"}
    )
    assert response.status in ("queued", "in_progress")
    assert response.background is True
    assert response.output == []

    async def completed() -> Response | None:
        current = await gateway.client.responses.retrieve(response.id)
        return current if current.status == "completed" else None

    done = await eventually(completed)
    assert done.output_text == expected_text("background please")


async def test_background_streaming_create(gateway: Gateway) -> None:
    async with gateway.client.responses.stream(model="sim-1", input="bg stream", background=True) as stream:
        final = await stream.get_final_response()
    assert final.background is True
    assert final.output_text == expected_text("bg stream")


async def test_snapshot_always_equals_the_replayed_events(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="replay me")
    stored, replayed = await stored_snapshot_and_replay(gateway, response.id)
    assert stored == replayed
    assert stored["status"] == "completed"
    # The terminal event carries the whole response, so check the deltas too: replaying everything before it
    # must already have built the final output.
    assert gateway.app is not None
    events = await gateway.app[STORE].read_events(response.id, -1, limit=1000)
    before_terminal: dict[str, Any] = {}
    for event in events[:-1]:
        before_terminal = apply_event(before_terminal, orjson.loads(event.data))
    assert before_terminal["status"] == "in_progress"
    assert before_terminal["output"] == stored["output"]


async def test_snapshot_matches_events_while_the_run_is_in_flight(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(
        model="sim-1", input="in flight", background=True, metadata={"sim_token_delay_ms": "30"}
    )
    seen_partial = False
    for _ in range(40):
        stored, replayed = await stored_snapshot_and_replay(gateway, response.id)
        assert stored == replayed
        if stored["status"] == "completed":
            break
        seen_partial = seen_partial or bool(stored["output"])
        await asyncio.sleep(0.02)
    assert seen_partial


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "no model"}, "model"),
        ({"model": "sim-1"}, "input"),
        ({"model": "sim-1", "input": 5}, "input"),
        ({"model": "sim-1", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "sim-1", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "sim-1", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "sim-1", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "sim-1", "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"model": "sim-1", "input": "x", "metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"model": "sim-1", "input": "x", "include": ["nonsense"]}, "include[0]"),
        ({"model": "sim-1", "input": "x", "truncation": "sometimes"}, "truncation"),
        ({"model": "sim-1", "input": "x", "background": True, "store": False}, "background"),
        ({"model": "sim-1", "input": "x", "stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"model": "sim-1", "input": [{"type": "message", "content": "no role"}]}, "input[0].role"),
        # Items the gateway would store and replay later: odd ones are refused now, not found broken next turn.
        ({"model": "sim-1", "input": [{"role": "user", "content": "hi", "id": {"a": 1}}]}, "input[0].id"),
        ({"model": "sim-1", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"model": "sim-1", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
        ({"model": "sim-1", "input": [{"type": ["x"]}]}, "input[0].type"),
        ({"model": "sim-1", "input": "x", "context_management": [{"type": "other"}]}, "context_management[0].type"),
    ],
)
async def test_invalid_bodies_get_a_400_naming_the_param_and_store_nothing(
    gateway: Gateway, simulator_url: str, body: dict[str, Any], param: str
) -> None:
    before = (await sim_stats(simulator_url))["requests"]
    async with gateway.http.post("/v1/responses", json=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert (await sim_stats(simulator_url))["requests"] == before


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_a_body_that_is_not_a_json_object_gets_a_400(gateway: Gateway, raw: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    async with gateway.http.post("/v1/responses", data=raw, headers=headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"


async def test_sdk_raises_bad_request_for_background_without_store(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client.responses.create(model="sim-1", input="x", background=True, store=False)
    assert caught.value.param == "background"


async def test_invalid_request_leaves_no_key_in_redis(
    redis_gateway: Gateway, key_prefix: str, shared_redis_client: aioredis.Redis | RedisCluster
) -> None:
    for body in ({"model": "sim-1", "input": "x", "background": True, "store": False}, {"input": "x"}):
        async with redis_gateway.http.post("/v1/responses", json=body) as response:
            assert response.status == 400
    assert await keys_with_prefix(shared_redis_client, key_prefix) == []


async def test_every_key_a_run_writes_has_a_ttl_and_one_hash_tag(
    redis_gateway: Gateway, key_prefix: str, shared_redis_client: aioredis.Redis | RedisCluster
) -> None:
    first = await redis_gateway.client.responses.create(model="sim-1", input="keys one")
    second = await redis_gateway.client.responses.create(model="sim-1", input="keys two", background=True)
    async with redis_gateway.client.responses.stream(model="sim-1", input="keys three") as stream:
        third = await stream.get_final_response()
    keys = await keys_with_prefix(shared_redis_client, key_prefix)
    assert len(keys) == 9
    for key in keys:
        ttl = await shared_redis_client.pttl(key)
        assert 0 < ttl <= 600_000, (key, ttl)
    for response_id in (first.id, second.id, third.id):
        assert sum(f":{response_id}:".encode() in key for key in keys) == 3


async def test_unknown_response_is_a_404_envelope(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError):
        await gateway.client.responses.retrieve("resp_doesnotexist")
    async with gateway.http.get("/v1/responses/resp_doesnotexist") as response:
        assert response.status == 404
        body = await response.json()
    assert body == {
        "error": {
            "message": "Response with id 'resp_doesnotexist' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": None,
        }
    }


async def test_unknown_route_is_a_404_envelope(gateway: Gateway) -> None:
    async with gateway.http.get("/v1/nothing-here") as response:
        assert response.status == 404
        assert (await response.json())["error"] == {
            "message": "Unknown request URL: GET /v1/nothing-here. Please check the URL for typos.",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    with pytest.raises(openai.NotFoundError) as raised:
        await gateway.client.post("/nothing-here", body={"model": "sim-1"}, cast_to=object)
    assert raised.value.code == "unknown_url"


async def test_a_method_a_route_does_not_serve_is_a_405_that_names_the_allowed_ones(gateway: Gateway) -> None:
    created = await gateway.client.responses.create(model="sim-1", input="one")
    with pytest.raises(openai.APIStatusError) as raised:
        await gateway.client.post(f"/responses/{created.id}", body={"model": "sim-1"}, cast_to=object)
    assert raised.value.status_code == 405
    assert raised.value.response.headers["Allow"] == "DELETE, GET, HEAD"
    assert raised.value.body == {
        "message": f"Method POST is not allowed for /v1/responses/{created.id}; allowed: DELETE, GET, HEAD.",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }
    assert await gateway.client.responses.retrieve(created.id) == created


async def test_store_false_answers_but_keeps_nothing(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="forget me", store=False)
    assert response.status == "completed"
    assert response.store is False
    assert response.output_text == expected_text("forget me")
    with pytest.raises(openai.NotFoundError):
        await gateway.client.responses.retrieve(response.id)
    assert gateway.app is not None
    store = gateway.app[STORE]

    async def gone() -> bool:
        return await store.get_response(response.id) is None

    await eventually(gone)


async def test_stored_stream_survives_its_subscriber_disconnecting(gateway: Gateway) -> None:
    """Done-when: a store=true streaming client leaves after 3 events; the response still completes with exactly
    the text an uninterrupted stream produces."""
    prompt = "disconnect early"
    pace = {"sim_token_delay_ms": "20"}
    async with gateway.client.responses.stream(model="sim-1", input=prompt, metadata=pace) as uninterrupted:
        full = await uninterrupted.get_final_response()
    stream = await gateway.client.responses.create(model="sim-1", input=prompt, stream=True, metadata=pace)
    received = []
    async for event in stream:
        received.append(event)
        if len(received) == 3:
            break
    await stream.close()
    response_id = received[0].response.id  # type: ignore[union-attr]
    assert (await gateway.client.responses.retrieve(response_id)).status == "in_progress"  # left mid-run

    async def completed() -> Response | None:
        current = await gateway.client.responses.retrieve(response_id)
        return current if current.status == "completed" else None

    done = await eventually(completed)
    assert done.output_text == full.output_text == expected_text(prompt)


async def test_store_false_stream_disconnect_cancels_the_upstream_call(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    stream = await gateway.client.responses.create(
        model="sim-1",
        input="cancel on leave",
        stream=True,
        store=False,
        metadata={"sim_token_delay_ms": "200", "sim_tag": key_prefix},
    )
    received = []
    async for event in stream:
        received.append(event)
        if len(received) == 4:
            break
    await stream.close()

    async def upstream_closed() -> bool:
        return bool((await sim_stats(simulator_url))["disconnects_by_tag"].get(key_prefix) == 1)

    await eventually(upstream_closed, within=5)
    assert gateway.app is not None
    store = gateway.app[STORE]
    response_id = received[0].response.id  # type: ignore[union-attr]

    async def discarded() -> bool:
        return await store.get_response(response_id) is None

    await eventually(discarded)


@pytest.mark.parametrize(
    ("fault", "status", "error_class"),
    [
        ("http_500", 502, openai.InternalServerError),
        ("http_400", 400, openai.BadRequestError),
        ("http_429", 429, openai.RateLimitError),
    ],
)
async def test_upstream_refusal_of_a_synchronous_request_is_an_error_status(
    gateway: Gateway, fault: str, status: int, error_class: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error_class) as caught:
        await gateway.client.responses.create(model="sim-1", input="refused", metadata={"sim_fault": fault})
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict)
    assert body.get("message")


async def test_upstream_refusal_of_a_stream_ends_it_with_response_failed(gateway: Gateway) -> None:
    stream = await gateway.client.responses.create(
        model="sim-1", input="refused stream", stream=True, metadata={"sim_fault": "http_500"}
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "server_error"


async def test_upstream_crash_mid_stream_fails_the_response_and_keeps_partial_output(gateway: Gateway) -> None:
    stream = await gateway.client.responses.create(
        model="sim-1", input="crash midway", stream=True, metadata={"sim_fail_after": "8"}
    )
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas, "some output arrived before the crash"
    stored = await gateway.client.responses.retrieve(events[0].response.id)  # type: ignore[union-attr]
    assert stored.status == "failed"
    assert stored.error is not None
    assert stored.error.code == "server_error"
    assert stored.output_text == "".join(deltas)


async def test_upstream_error_event_fails_the_response(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(
        model="sim-1", input="error event", metadata={"sim_fault": "error_event"}
    )
    assert response.status == "failed"
    assert response.error is not None
    assert "simulated failure" in response.error.message


async def test_max_output_tokens_cap_ends_incomplete(gateway: Gateway) -> None:
    response = await gateway.client.responses.create(model="sim-1", input="long answer", max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 16


async def test_request_fields_are_echoed_and_forwarded(gateway: Gateway, simulator_url: str, key_prefix: str) -> None:
    response = await gateway.client.responses.create(
        model="sim-1",
        input=[{"role": "user", "content": "items input"}],
        instructions="be brief",
        temperature=0.5,
        metadata={"sim_tag": key_prefix},
    )
    assert response.instructions == "be brief"
    assert response.temperature == 0.5
    assert response.output_text == expected_text([{"role": "user", "content": "items input"}], instructions="be brief")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{simulator_url}/sim/requests", params={"tag": key_prefix}) as reply,
    ):
        received = await reply.json()
    body = received[-1]
    assert body["stream"] is True
    assert body["store"] is False
    assert body["instructions"] == "be brief"
    assert body["temperature"] == 0.5
    assert "background" not in body


async def test_health_and_readiness(gateway: Gateway) -> None:
    async with gateway.http.get("/healthz") as response:
        assert response.status == 200
    async with gateway.http.get("/readyz") as response:
        assert response.status == 200


_WEATHER_TOOL: Any = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
# A turn whose model called the tool: the call made part of the history (the simulator's Responses endpoint does
# not make calls itself).
_CALLED: Any = [
    {"role": "user", "content": "weather?"},
    {"type": "function_call", "call_id": "call_weather", "name": "get_weather", "arguments": "{}"},
]


def _output_for(call_id: str) -> Any:
    return [{"type": "function_call_output", "call_id": call_id, "output": "sunny"}]


async def test_a_tool_output_must_answer_a_call_of_its_history(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    tagged = {"sim_tag": key_prefix}
    first = await gateway.client.responses.create(model="sim-1", input=_CALLED, tools=[_WEATHER_TOOL], metadata=tagged)
    calls_before = await upstream_calls(simulator_url, key_prefix)

    for refused in (
        {"previous_response_id": first.id, "input": _output_for("call_unknown")},  # not in the chain
        {"input": _output_for("call_weather")},  # no history at all: the call is not in this request
        {"input": [*_CALLED, *_output_for("call_x")]},
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            await gateway.client.responses.create(model="sim-1", tools=[_WEATHER_TOOL], metadata=tagged, **refused)
        assert raised.value.param in ("input[0].call_id", "input[2].call_id")
        assert "No tool call found for function call output with call_id" in raised.value.message
    assert await upstream_calls(simulator_url, key_prefix) == calls_before  # nothing was sent, nothing stored

    for answered in (
        {"previous_response_id": first.id, "input": _output_for("call_weather")},
        {"input": [*_CALLED, *_output_for("call_weather")]},
    ):
        response = await gateway.client.responses.create(model="sim-1", metadata=tagged, **answered)
        assert response.status == "completed"


async def test_a_conversation_turn_whose_tool_output_answers_no_call_is_refused_and_leaves_the_conversation(
    gateway: Gateway, key_prefix: str
) -> None:
    tagged = {"sim_tag": key_prefix}
    conversation = await gateway.client.conversations.create()
    await gateway.client.responses.create(
        model="sim-1", input=_CALLED, tools=[_WEATHER_TOOL], conversation=conversation.id, metadata=tagged
    )
    items_before = [item.id async for item in gateway.client.conversations.items.list(conversation.id)]

    with pytest.raises(openai.BadRequestError) as raised:
        await gateway.client.responses.create(
            model="sim-1", conversation=conversation.id, input=_output_for("call_unknown"), metadata=tagged
        )
    assert raised.value.param == "input[0].call_id"
    assert [item.id async for item in gateway.client.conversations.items.list(conversation.id)] == items_before

    answered = await gateway.client.responses.create(
        model="sim-1", conversation=conversation.id, input=_output_for("call_weather"), metadata=tagged
    )
    assert answered.status == "completed"  # the refused turn left the conversation free
