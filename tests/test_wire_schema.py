"""Every Response, event and list the gateway sends satisfies the SDK's models made strict, over both upstream
kinds. (Every other test is checked too, by conftest's `strict_wire`; this one makes sure each kind of event and
body is produced at least once, and that the check itself refuses what a strict client refuses.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest

from gateway.config import load_settings
from runs.request import CreateResponseRequest
from runs.snapshot import apply_event, initial_snapshot, upstream_reported
from runs.status import ResponseStatus
from tests.conftest import Gateway, serve_gateway
from tests.strict_models import BODY_MODELS, check_event
from tests.wire_check import WireCheck

_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def _snapshot(**request: Any) -> dict[str, Any]:
    parsed = CreateResponseRequest.model_validate({"model": "m", "input": "hi", **request})
    return initial_snapshot(parsed, response_id="resp_1", created_at=1, status=ResponseStatus.QUEUED)


# The check refuses what a strict client refuses: otherwise a green suite would prove nothing.


def test_a_new_response_has_every_field_a_strict_client_requires() -> None:
    BODY_MODELS["response"].model_validate(_snapshot(tools=[_TOOL], temperature=0.2, top_logprobs=3))
    snapshot = _snapshot(tools=[_TOOL])
    assert snapshot["tools"][0]["strict"] is True  # OpenAI's default for function tools, echoed
    assert (snapshot["presence_penalty"], snapshot["frequency_penalty"], snapshot["top_logprobs"]) == (0.0, 0.0, 0)
    assert snapshot["text"] == {"format": {"type": "text"}, "verbosity": "medium"}


@pytest.mark.parametrize(
    "spoil",
    [
        lambda r: r.pop("presence_penalty"),
        lambda r: r.pop("prompt_cache_retention"),  # declared by the SDK, so it must be there even when null
        lambda r: r.update(top_logprobs=None),
        lambda r: r.update(temperature="1"),  # no coercion
        lambda r: r.update(surprise=1),
        lambda r: r["tools"][0].pop("strict"),
        lambda r: r.update(usage={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}),
    ],
)
def test_the_strict_models_refuse_what_strict_clients_refuse(spoil: Any) -> None:
    response = _snapshot(tools=[_TOOL])
    spoil(response)
    with pytest.raises(pydantic.ValidationError):
        BODY_MODELS["response"].model_validate(response)


def test_events_are_checked_by_their_type() -> None:
    delta = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0}
    check_event({**delta, "delta": "x", "logprobs": [], "sequence_number": 3})
    with pytest.raises(pydantic.ValidationError):
        check_event({**delta, "delta": "x", "sequence_number": 3})  # logprobs is required
    with pytest.raises(KeyError):
        check_event({"type": "response.made_up", "sequence_number": 1})


def test_what_an_upstream_reports_is_kept_only_when_usable() -> None:
    reported = upstream_reported(
        {"id": "theirs", "service_tier": "default", "temperature": "hot", "top_logprobs": 2.5, "top_p": 0.5}
    )
    assert reported == {"service_tier": "default", "top_p": 0.5}


# End to end: each kind of event and body, through each kind of upstream.


@pytest.fixture(params=["responses", "chat"])
async def kind_gateway(request: pytest.FixtureRequest, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    upstream: dict[str, Any] = {
        "name": "sim",
        "kind": request.param,
        "base_url": f"{simulator_url}/v1",
        "max_retries": 0,
    }
    if request.param == "chat":
        upstream["send_metadata"] = True  # the simulator reads its knobs from metadata
    settings = load_settings(storage={"url": "memory://", "key_prefix": key_prefix}, upstreams=[upstream])
    async with serve_gateway(settings) as served:
        served.extra["kind"] = request.param
        yield served


# What every upstream kind produces in the scenarios below; chat adds reasoning (the simulator's chat endpoint
# streams it on request).
_EVENTS_OF_EVERY_KIND = {
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.completed",
    "response.incomplete",
    "response.failed",
}


async def test_every_event_and_body_satisfies_the_strict_models(
    kind_gateway: Gateway, wire_check: WireCheck, key_prefix: str
) -> None:
    client = kind_gateway.client
    tag = {"sim_tag": key_prefix}
    wire_check.problems()
    wire_check.event_types.clear()

    async with client.responses.stream(model="sim-1", input="hello", tools=[_TOOL], metadata=tag) as stream:
        called = await stream.get_final_response()
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls, called.output
    answer_input: Any = [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}]
    async with client.responses.stream(
        model="sim-1", previous_response_id=called.id, input=answer_input, tools=[_TOOL], metadata=tag
    ) as stream:
        answered = await stream.get_final_response()
    assert answered.output_text

    cut = await client.responses.create(model="sim-1", input="long", max_output_tokens=3, stream=True, metadata=tag)
    assert [event.type async for event in cut][-1] == "response.incomplete"
    broken = await client.responses.create(
        model="sim-1", input="x", stream=True, metadata={**tag, "sim_fault": "error_event"}
    )
    assert [event.type async for event in broken][-1] == "response.failed"
    if kind_gateway.extra["kind"] == "chat":
        thought = await client.responses.create(
            model="sim-1", input="think", stream=True, metadata={**tag, "sim_reasoning": "3"}
        )
        assert [event.type async for event in thought][-1] == "response.completed"

    running = await client.responses.create(
        model="sim-1", input="slow", background=True, metadata={**tag, "sim_fault": "hang"}
    )
    cancelled = await client.responses.cancel(running.id)
    assert cancelled.status == "cancelled"
    replayed = await client.responses.retrieve(running.id, stream=True)
    assert [event.type async for event in replayed][-1] in (
        "response.failed",
        "response.incomplete",
        "response.completed",
    )

    # Bodies: a stored response, its input items, a conversation and its items.
    await client.responses.retrieve(answered.id)
    await client.responses.input_items.list(answered.id)
    conversation = await client.conversations.create(items=[{"role": "user", "content": "earlier"}])
    await client.responses.create(model="sim-1", input="now", conversation=conversation.id, metadata=tag)
    items = await client.conversations.items.list(conversation.id)
    await client.conversations.items.retrieve(items.data[0].id, conversation_id=conversation.id)
    await client.conversations.retrieve(conversation.id)
    await asyncio.sleep(0)

    problems = wire_check.problems()
    assert problems == []
    expected = _EVENTS_OF_EVERY_KIND | (
        {"response.reasoning_text.delta"} if kind_gateway.extra["kind"] == "chat" else set()
    )
    assert expected <= wire_check.event_types, expected - wire_check.event_types
    assert wire_check.bodies_checked >= 6


def test_a_snapshot_folded_mid_stream_holds_logprobs_in_the_part_shape() -> None:
    """Text deltas carry logprobs without `bytes`; the output text part they are folded into requires them."""
    snapshot = _snapshot()
    message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    for event in (
        {"type": "response.output_item.added", "output_index": 0, "item": message},
        {"type": "response.content_part.added", **where, "part": part},
        {
            "type": "response.output_text.delta",
            **where,
            "delta": "Hé",
            "logprobs": [{"token": "Hé", "logprob": -0.1, "top_logprobs": [{"token": "Ho", "logprob": -2.0}]}],
        },
    ):
        snapshot = apply_event(snapshot, event)
    BODY_MODELS["response"].model_validate(snapshot)
    assert snapshot["output"][0]["content"][0]["logprobs"][0]["bytes"] == list("Hé".encode())
