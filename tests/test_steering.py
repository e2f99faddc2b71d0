"""Steering, over the SDK's `responses.connect()` and over HTTP: a steer sent to either instance reaches the run
wherever it is owned, the run ends `incomplete` / `steered` at a safe boundary, and a successor continues with
the steering input; the pending and failed outcomes; and an owner that dies between the end and the successor."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.conftest import Gateway, eventually, serve_gateway
from tests.helpers import sim_requests
from tests.lifecycle_checks import Freezer
from tests.test_lifecycle_faults import FreezerFaults
from tests.websocket_support import TERMINAL, knobs, settings_for, until_terminal


async def once_ended(gateway: Gateway, response_id: str) -> Any:
    """The response, once it has ended."""

    async def ended() -> Any:
        response = await gateway.client.responses.retrieve(response_id)
        return response if response.status not in ("queued", "in_progress") else None

    return await eventually(ended, interval=0.02)


async def steering_reaches(gateway: Gateway, response_id: str, *statuses: str) -> dict[str, Any]:
    """`GET /v1/responses/{id}/steering`, once its status is one of `statuses`."""

    async def reached() -> dict[str, Any] | None:
        state: dict[str, Any] = await (await gateway.http.get(f"/v1/responses/{response_id}/steering")).json()
        return state if state["status"] in statuses else None

    result: dict[str, Any] = await eventually(reached, interval=0.02)
    return result


async def until_event(connection: Any, kind: str) -> list[Any]:
    events = []
    async with asyncio.timeout(20):
        async for event in connection:
            events.append(event)
            if event.type == kind:
                return events
            assert event.type not in TERMINAL, event
    return events


async def first_delta(connection: Any) -> list[Any]:
    events = []
    async with asyncio.timeout(20):
        async for event in connection:
            events.append(event)
            if event.type in ("response.output_text.delta", "response.function_call_arguments.delta"):
                return events
            assert event.type not in TERMINAL, event
    return events


async def test_a_steer_sent_to_the_other_instance_continues_the_run(
    two_instances: tuple[Gateway, Gateway], simulator_url: str
) -> None:
    owner, other = two_instances
    label = owner.extra["tag"]
    # Steered while the provider has not begun its output (a safe boundary: no item is open), so the run stops at
    # once; steered later, a run finishes the item it has begun (see the test at any point below). The provider
    # thinks long enough for the steer to arrive first on a loaded machine: 400 ms once did not (CI, full suite).
    thinking = {**knobs(label, tokens=40, delay_ms=15), "sim_ttft_ms": "1500"}
    async with owner.client.responses.connect() as socket, other.client.responses.connect() as steering_socket:
        await socket.response.create(model="sim-1", input="tell a story", stream_id="story", metadata=thinking)
        started = await until_event(socket, "response.in_progress")
        response_id = started[0].response.id
        await steering_socket.response.steer(previous_response_id=response_id, input="make it about foxes")
        accepted = await steering_socket.recv()
        assert accepted.type == "response.steer.accepted", accepted
        assert accepted.steer.previous_response_id == response_id
        assert accepted.steer.id.startswith("steer_")
        assert accepted.stream_id == "story", "a steer's events are on the lane of the response it steers"
        rest = await until_terminal(socket, responses=2)
    steered = rest[[event.type for event in rest].index("response.incomplete")]
    assert steered.response.id == response_id
    assert steered.response.incomplete_details.reason == "steered"
    successor = next(event for event in rest if event.type == "response.created")
    assert successor.response.previous_response_id == response_id
    assert successor.stream_id == "story"
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.id == successor.response.id
    assert all(event.stream_id == "story" for event in rest)
    # The successor's provider call carries the steered turn and the steering input after it.
    sent = orjson.dumps((await sim_requests(simulator_url, label))[-1]).decode()
    assert "tell a story" in sent
    assert "make it about foxes" in sent
    assert sent.index("tell a story") < sent.index("make it about foxes")
    # Over HTTP the steered response says what became of its steering.
    reply = await owner.http.get(f"/v1/responses/{response_id}/steering")
    state = await reply.json()
    assert state["status"] == "committed"
    assert state["successor_response_id"] == successor.response.id


async def test_steering_refusals(redis_server: str, simulator_url: str, key_prefix: str) -> None:
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as gateway:
        async with gateway.client.responses.connect() as socket:
            await socket.response.create(model="sim-1", input="short", stream_id="s", metadata=knobs(key_prefix))
            done = (await until_terminal(socket))[-1]
            cases: list[tuple[str, Any, str]] = [
                (done.response.id, "too late", "response_already_completed"),
                ("resp_unknown00", "hello", "response_not_found"),
                (done.response.id, [{"role": "assistant", "content": "no"}], "invalid_input"),
                (done.response.id, [], "invalid_input"),
            ]
            for target, value, code in cases:
                await socket.response.steer(previous_response_id=target, input=value)
                failed = await socket.recv()
                assert failed.type == "response.steer.failed", failed
                assert failed.error.code == code, (value, failed)
                assert failed.steer.input == value
                assert failed.steer.id is None
            assert failed.stream_id is None
            await socket.send_raw(
                orjson.dumps(
                    {"type": "response.steer", "previous_response_id": done.response.id, "input": "x", "stream_id": "s"}
                )
            )
            extra = await socket.recv()
            assert extra.type == "response.steer.failed"
            assert extra.error.code == "invalid_input"
        # Over HTTP: the same codes, as error envelopes.
        for target, body, status, code in [
            (done.response.id, {"input": "late"}, 409, "response_already_completed"),
            ("resp_unknown00", {"input": "x"}, 404, "response_not_found"),
            (done.response.id, {"input": 3}, 400, "invalid_input"),
            (done.response.id, {"input": "x", "stream_id": "s"}, 400, "unknown_parameter"),
        ]:
            reply = await gateway.http.post(f"/v1/responses/{target}/steer", json=body)
            assert reply.status == status, await reply.text()
            assert (await reply.json())["error"]["code"] == code


WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    }
]


async def test_concurrent_continuations_of_a_pending_response(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """Several continuations of a response whose steering waits for its tool outputs (parallel branches, or
    retries): exactly one takes the input; the others are told to retry (409), never a 500."""
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as gateway:
        stream = await gateway.client.responses.create(
            model="sim-1",
            input="weather?",
            tools=WEATHER_TOOLS,
            background=True,
            stream=True,
            metadata=knobs(key_prefix, delay_ms=60),
        )
        response_id = None
        async for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            if event.type == "response.function_call_arguments.delta":
                break
        await stream.close()
        reply = await gateway.http.post(f"/v1/responses/{response_id}/steer", json={"input": "and tomorrow too"})
        assert reply.status == 200, await reply.text()
        await steering_reaches(gateway, str(response_id), "pending")
        ended = await gateway.client.responses.retrieve(str(response_id))
        call = next(item for item in ended.output if item.type == "function_call")
        body = {
            "model": "sim-1",
            "previous_response_id": response_id,
            "input": [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],  # type: ignore[union-attr]
            "metadata": knobs(key_prefix),
        }
        replies = await asyncio.gather(*(gateway.http.post("/v1/responses", json=body) for _ in range(4)))
        statuses = sorted(reply.status for reply in replies)
        assert set(statuses) <= {200, 409}, statuses
        for reply in replies:
            if reply.status == 409:
                assert (await reply.json())["error"]["code"] == "steering_input_taken"
        assert 200 in statuses
        sent = await sim_requests(simulator_url, key_prefix)
        assert sum("and tomorrow too" in orjson.dumps(body).decode() for body in sent) == 1


async def steer_during_a_call(socket: Any, **create: Any) -> tuple[str, list[Any]]:
    """Ask for the weather (the model calls the tool), steer while the call's arguments stream, and read until
    `response.steer.pending`: the response's id and the events read."""
    await socket.response.create(model="sim-1", input="weather?", tools=WEATHER_TOOLS, **create)
    started = await first_delta(socket)
    response_id: str = started[0].response.id
    await socket.response.steer(previous_response_id=response_id, input="and tomorrow too")
    events = []
    async with asyncio.timeout(20):
        async for event in socket:
            events.append(event)
            if event.type == "response.steer.pending":
                break
    return response_id, events


async def test_steering_waits_for_tool_outputs_then_goes_first(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    label = key_prefix
    tools = WEATHER_TOOLS
    async with (
        serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as gateway,
        gateway.client.responses.connect() as socket,
    ):
        response_id, events = await steer_during_a_call(socket, stream_id="t", metadata=knobs(label, delay_ms=60))
        kinds = [event.type for event in events]
        assert "response.steer.accepted" in kinds
        ended = next(event for event in events if event.type in TERMINAL)
        call = next(item for item in ended.response.output if item.type == "function_call")
        pending = events[-1]
        assert pending.steer.previous_response_id == response_id
        assert pending.stream_id == "t"
        assert pending.reason == "waiting_for_required_input"
        assert [(stub.type, stub.call_id, stub.name) for stub in pending.required_input] == [
            ("function_call_output", call.call_id, "get_weather")
        ]
        await socket.response.create(
            model="sim-1",
            previous_response_id=response_id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            tools=tools,  # type: ignore[arg-type]
            stream_id="t",
            metadata=knobs(label),
        )
        answer = (await until_terminal(socket))[-1]
        assert answer.type == "response.completed", answer
        sent = orjson.dumps((await sim_requests(simulator_url, label))[-1]).decode()
        assert sent.index("and tomorrow too") < sent.index("sunny"), "queued steering goes before the tool outputs"
        reply = await gateway.http.get(f"/v1/responses/{response_id}/steering")
        assert (await reply.json())["successor_response_id"] == answer.response.id


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_a_background_run_steered_over_http(
    backend: str, request: pytest.FixtureRequest, simulator_url: str, key_prefix: str
) -> None:
    label = key_prefix
    storage_url = "memory://" if backend == "memory" else request.getfixturevalue("redis_server")
    async with serve_gateway(settings_for(storage_url, simulator_url, key_prefix)) as gateway:
        created = await gateway.client.responses.create(
            model="sim-1",
            input="draft a plan",
            background=True,
            metadata={**knobs(label, tokens=40, delay_ms=15), "sim_ttft_ms": "300"},
        )
        reply = await gateway.http.post(f"/v1/responses/{created.id}/steer", json={"input": "shorter, please"})
        assert reply.status == 200, await reply.text()
        accepted = await reply.json()
        assert accepted["status"] == "accepted"
        assert accepted["previous_response_id"] == created.id
        successor_id = (await steering_reaches(gateway, created.id, "committed"))["successor_response_id"]
        successor = await once_ended(gateway, successor_id)
        assert successor.status == "completed"
        assert successor.previous_response_id == created.id
        steered = await gateway.client.responses.retrieve(created.id)
        assert steered.status == "incomplete"
        assert steered.incomplete_details is not None
        assert steered.incomplete_details.reason == "steered"
        items = [item async for item in gateway.client.responses.input_items.list(successor_id)]
        assert "shorter, please" in orjson.dumps([item.model_dump() for item in items]).decode()


@pytest.mark.parametrize("boundary", ["finish.terminal_stored", "finish.steers_resolved"])
async def test_an_owner_that_dies_around_the_successor(
    boundary: str, redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """The owner stores the steered end and dies before resolving the steering (or just after, before the
    response leaves the run index): another instance's sweeper settles the response, and exactly one successor
    runs, which the client's socket (on the dead-looking owner, which still serves its socket) goes on with."""
    label = key_prefix
    settings = settings_for(redis_server, simulator_url, key_prefix)
    freezer = Freezer(boundary, only=lambda response_id: steered_id.get("id") == response_id)
    faults = FreezerFaults(freezer)
    steered_id: dict[str, str] = {}
    async with serve_gateway(settings, faults) as owner:
        freezer.app = owner.app
        async with owner.client.responses.connect() as socket:
            thinking = {**knobs(label, tokens=10), "sim_ttft_ms": "300"}
            await socket.response.create(model="sim-1", input="a long one", metadata=thinking)
            started = await until_event(socket, "response.in_progress")
            steered_id["id"] = started[0].response.id
            await socket.response.steer(previous_response_id=steered_id["id"], input="change of plan")
            await asyncio.wait_for(freezer.reached, 20)
            async with serve_gateway(settings) as _rescuer:
                rest = await until_terminal(socket, responses=2)
    kinds = [event.type for event in rest]
    assert "response.incomplete" in kinds, kinds
    assert rest[-1].type == "response.completed", kinds
    assert rest[-1].response.previous_response_id == steered_id["id"]
    sent = await sim_requests(simulator_url, label)
    assert sum("change of plan" in orjson.dumps(body).decode() for body in sent) == 1


@pytest.mark.parametrize("after_events", [1, 2, 5, 12, 25, 26, 27, 40])
async def test_a_steer_at_any_point_is_committed_once_or_refused(
    after_events: int, redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """Steer a response after its n-th event, from before its first token to after its end (its end is event 27
    or so): the input is either committed by exactly one successor, which completes with it, or refused because
    the response had ended; never lost, never applied twice, nothing left running."""
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as gateway:
        stream = await gateway.client.responses.create(
            model="sim-1", input="count", background=True, stream=True, metadata=knobs(key_prefix, tokens=20)
        )
        seen: list[Any] = []
        async for event in stream:
            seen.append(event)
            if len(seen) == after_events:
                break
        await stream.close()
        response_id = seen[0].response.id
        reply = await gateway.http.post(f"/v1/responses/{response_id}/steer", json={"input": "one more thing"})
        assert reply.status in (200, 409), await reply.text()
        state = await steering_reaches(gateway, response_id, "committed", "none", "failed", "pending")
        steered = await gateway.client.responses.retrieve(response_id)
        if reply.status == 409:
            assert (await reply.json())["error"]["code"] == "response_already_completed"
            assert state["status"] == "none"
            assert steered.status == "completed"
            return
        assert state["status"] == "committed", state
        if steered.status == "incomplete":
            assert steered.incomplete_details is not None
            assert steered.incomplete_details.reason == "steered"
        else:
            assert steered.status == "completed"
        successor_id = state["successor_response_id"]
        successor = await once_ended(gateway, successor_id)
        assert successor.status == "completed"
        sent = await sim_requests(simulator_url, key_prefix)
        with_steer = [body for body in sent if "one more thing" in orjson.dumps(body).decode()]
        assert len(with_steer) == 1, "the steering input reached the provider once"


async def test_a_steer_before_the_first_token_stops_the_run_at_once(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """No output item is open while the provider thinks: that is a safe boundary, so the run stops there, with no
    output, and the successor starts from the steering input."""
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as gateway:
        slow_start = {**knobs(key_prefix), "sim_ttft_ms": "60000"}
        created = await gateway.client.responses.create(
            model="sim-1", input="think", background=True, metadata=slow_start
        )
        reply = await gateway.http.post(f"/v1/responses/{created.id}/steer", json={"input": "never mind"})
        assert reply.status == 200, await reply.text()
        steered = await once_ended(gateway, created.id)
        assert steered.status == "incomplete"
        assert steered.output == []
        await steering_reaches(gateway, created.id, "committed")


async def test_a_queued_response_steered_before_it_starts(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """The steer is announced while nobody runs the response (it waits for a run slot): the instance that starts
    it remembers the notice, so the run stops before its first output item, and the successor follows."""
    settings = settings_for(redis_server, simulator_url, key_prefix, runs={"max_concurrent": 1})
    async with serve_gateway(settings) as gateway:
        busy = await gateway.client.responses.create(
            model="sim-1", input="first", background=True, metadata=knobs(key_prefix, tokens=30)
        )
        waiting = await gateway.client.responses.create(
            model="sim-1", input="second", background=True, metadata=knobs(key_prefix)
        )
        assert waiting.status == "queued"
        reply = await gateway.http.post(f"/v1/responses/{waiting.id}/steer", json={"input": "actually, stop"})
        assert reply.status == 200, await reply.text()
        steered = await once_ended(gateway, waiting.id)
        assert steered.status == "incomplete"
        assert steered.output == []
        assert (await gateway.client.responses.retrieve(busy.id)).status in ("in_progress", "completed")


async def test_a_store_false_response_is_steered_on_its_own_socket(
    redis_server: str, simulator_url: str, key_prefix: str
) -> None:
    """Nothing of a store=false response is stored, so its steering stays with its socket (as at OpenAI): the run
    is stopped directly and the socket continues it with the input, from its own memory; another socket cannot
    steer it. With tool calls waiting, the input goes first into the client's continuation."""
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as gateway:
        async with gateway.client.responses.connect() as socket, gateway.client.responses.connect() as other:
            thinking = {**knobs(key_prefix), "sim_ttft_ms": "300"}
            await socket.response.create(
                model="sim-1", input="private words", store=False, stream_id="p", metadata=thinking
            )
            response_id = (await until_event(socket, "response.in_progress"))[0].response.id
            await other.response.steer(previous_response_id=response_id, input="from elsewhere")
            refused = await other.recv()
            assert refused.type == "response.steer.failed"
            assert refused.error.code == "response_not_found"
            await socket.response.steer(previous_response_id=response_id, input="steer privately")
            events = await until_terminal(socket, responses=2)
        kinds = [event.type for event in events]
        assert kinds[0] == "response.steer.accepted", kinds
        assert events[0].stream_id == "p"
        assert "response.incomplete" in kinds
        assert events[-1].type == "response.completed"
        assert all(event.stream_id == "p" for event in events)
        sent = orjson.dumps((await sim_requests(simulator_url, key_prefix))[-1]).decode()
        assert sent.index("private words") < sent.index("steer privately")
        # Waiting for tool outputs: the input goes first into the socket's continuation.
        async with gateway.client.responses.connect() as socket:
            response_id, events = await steer_during_a_call(
                socket, store=False, metadata=knobs(key_prefix, delay_ms=60)
            )
            call = next(
                item
                for event in events
                if event.type in TERMINAL
                for item in event.response.output
                if item.type == "function_call"
            )
            await socket.response.create(
                model="sim-1",
                previous_response_id=response_id,
                store=False,
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],  # type: ignore[union-attr]
                tools=WEATHER_TOOLS,
                metadata=knobs(key_prefix),
            )
            answer = (await until_terminal(socket))[-1]
        assert answer.type == "response.completed", answer
        sent = orjson.dumps((await sim_requests(simulator_url, key_prefix))[-1]).decode()
        assert sent.index("weather?") < sent.index("and tomorrow too") < sent.index("sunny")
