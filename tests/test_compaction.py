"""`client.responses.compact` through the gateway: passed through to a Responses provider that compacts, made by
the gateway (a summary from the routed model) over any other, and expanded again when sent back as input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from gateway.config import load_settings
from runs.compaction import CONTENT_PREFIX, SUMMARY_INSTRUCTIONS
from tests.conftest import Gateway, serve_gateway
from tests.helpers import sim_requests

_EARLIER: Any = [
    {"role": "user", "content": "Plan a trip to Oslo."},
    {"role": "assistant", "content": "Sure: three days, museums first."},
    {"role": "user", "content": "Add a fjord cruise."},
]


@pytest.fixture(params=["responses", "chat", "responses-without-compact"])
async def compacting(
    request: pytest.FixtureRequest,
    simulator_url: str,
    storage_url: str,
    key_prefix: str,
    simulator_without_compact: str,
) -> AsyncIterator[Gateway]:
    kind = "chat" if request.param == "chat" else "responses"
    url = simulator_without_compact if request.param == "responses-without-compact" else simulator_url
    upstream = {
        "name": "sim",
        "kind": kind,
        "base_url": f"{url}/v1",
        "max_retries": 0,
        "headers": {"x-sim-tag": key_prefix},  # every provider call of this gateway, tagged
    }
    settings = load_settings(storage={"url": storage_url, "key_prefix": key_prefix}, upstreams=[upstream])
    async with serve_gateway(settings) as served:
        served.extra.update(case=request.param, simulator=url)
        yield served


async def test_a_compacted_window_continues_the_conversation(compacting: Gateway, key_prefix: str) -> None:
    client = compacting.client
    raw = await client.responses.with_raw_response.compact(model="sim-1", input=_EARLIER)
    compacted = raw.parse()
    assert compacted.object == "response.compaction"
    *kept, compaction = compacted.output
    assert compaction.type == "compaction"
    assert [(item.type, getattr(item, "role", None)) for item in kept] == [("message", "user"), ("message", "user")]
    assert compacted.usage.total_tokens > 0
    made_by_gateway = compacting.extra["case"] != "responses"
    assert compaction.encrypted_content.startswith(CONTENT_PREFIX) == made_by_gateway

    # Sent back as the JSON it came as: the SDK's output-item models cannot re-serialise the user's messages.
    window: Any = orjson.loads(raw.content)["output"]
    answer = await client.responses.create(model="sim-1", input=[*window, {"role": "user", "content": "Go on."}])
    assert answer.status == "completed"
    sent = (await sim_requests(compacting.extra["simulator"], key_prefix))[-1]
    if made_by_gateway:
        # The model was asked for a summary, and is given it (not the compacted assistant turn) afterwards.
        summary_call = (await sim_requests(compacting.extra["simulator"], key_prefix))[-2]
        assert SUMMARY_INSTRUCTIONS in str(summary_call)
        assert "museums first" in str(summary_call)
        assert "Summary of the earlier part of this conversation" in str(sent)
        assert "museums first" not in str(sent)
    else:
        assert any(item.get("type") == "compaction" for item in sent["input"])  # the provider's own item, back
    assert "Add a fjord cruise." in str(sent)


async def test_compacting_a_previous_response_chain(compacting: Gateway) -> None:
    client = compacting.client
    first = await client.responses.create(model="sim-1", input="Remember the number 7.")
    second = await client.responses.create(model="sim-1", previous_response_id=first.id, input="And 9.")
    compacted = await client.responses.compact(model="sim-1", previous_response_id=second.id, input="Sum them.")
    texts = [item.content[0].text for item in compacted.output if item.type == "message"]  # type: ignore[union-attr]
    assert texts == ["Remember the number 7.", "And 9.", "Sum them."]
    assert compacted.output[-1].type == "compaction"


async def test_bad_compact_requests_are_refused(compacting: Gateway) -> None:
    client = compacting.client
    with pytest.raises(openai.BadRequestError) as missing:
        await client.post("/responses/compact", body={"input": "hi"}, cast_to=object)
    assert missing.value.param == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.responses.compact(model="sim-1", previous_response_id="resp_missing")
    assert unknown.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as empty:
        await client.responses.compact(model="sim-1")
    assert empty.value.param == "input"
    damaged: Any = [{"role": "user", "content": "x"}, {"type": "compaction", "encrypted_content": CONTENT_PREFIX + "!"}]
    with pytest.raises(openai.BadRequestError) as broken:
        await client.responses.compact(model="sim-1", input=damaged)
    assert broken.value.param == "input[1].encrypted_content"
    with pytest.raises(openai.BadRequestError) as odd:
        await client.responses.compact(model="sim-1", input=[{"type": "function_call", "call_id": "c", "name": "f"}])
    assert odd.value.param == "input[0].arguments"
    with pytest.raises(openai.BadRequestError) as broken_create:
        await client.responses.create(model="sim-1", input=damaged)
    assert broken_create.value.param == "input[1].encrypted_content"


async def test_context_management_compacts_a_turn_that_reaches_the_threshold(
    compacting: Gateway, key_prefix: str
) -> None:
    client = compacting.client
    first = await client.responses.create(model="sim-1", input=_EARLIER)
    compact_early: Any = [{"type": "compaction", "compact_threshold": 20}]
    async with client.responses.stream(
        model="sim-1", previous_response_id=first.id, input="Now the budget.", context_management=compact_early
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[2:5] == ["response.output_item.added", "response.compaction.compacting", "response.output_item.done"]
    assert [item.type for item in final.output] == ["compaction", "message"]
    message_events = [e for e in events if e.type == "response.output_item.added" and e.item.type == "message"]
    assert [e.output_index for e in message_events] == [1]
    assert final.usage is not None
    assert final.output_text
    stored = await client.responses.retrieve(final.id)
    assert [item.type for item in stored.output] == ["compaction", "message"]

    # The provider was given the compacted context (the summary, or the provider's own item), not the earlier
    # assistant turn; and so is the next turn, which continues from the compacted one.
    sent = (await sim_requests(compacting.extra["simulator"], key_prefix))[-1]
    assert "museums first" not in str(sent)
    assert "Now the budget." in str(sent)
    assert "Add a fjord cruise." in str(sent)
    after = await client.responses.create(model="sim-1", previous_response_id=final.id, input="Thanks.")
    assert after.status == "completed"
    sent = (await sim_requests(compacting.extra["simulator"], key_prefix))[-1]
    assert "museums first" not in str(sent)
    assert ("Summary of the earlier part" in str(sent)) == (compacting.extra["case"] != "responses")


async def test_context_management_below_the_threshold_changes_nothing(compacting: Gateway) -> None:
    relaxed: Any = [{"type": "compaction", "compact_threshold": 1_000_000}]
    response = await compacting.client.responses.create(model="sim-1", input=_EARLIER, context_management=relaxed)
    assert [item.type for item in response.output] == ["message"]
    with pytest.raises(openai.BadRequestError) as unknown:
        await compacting.client.responses.create(model="sim-1", input="x", context_management=[{"type": "truncation"}])
    assert unknown.value.param == "context_management[0].type"


async def test_a_compacted_turn_keeps_the_tool_output_it_answers(compacting: Gateway, key_prefix: str) -> None:
    client = compacting.client
    tool: Any = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    called = await client.responses.create(model="sim-1", input=_EARLIER, tools=[tool])
    (call,) = [item for item in called.output if item.type == "function_call"]
    compact_early: Any = [{"type": "compaction", "compact_threshold": 20}]
    answer: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "Rain in Oslo all week."}]
    answered = await client.responses.create(
        model="sim-1", previous_response_id=called.id, input=answer, tools=[tool], context_management=compact_early
    )
    assert [item.type for item in answered.output] == ["compaction", "message"]
    # The model still sees the call it made and the output that answers it (not only the user's messages).
    sent = str((await sim_requests(compacting.extra["simulator"], key_prefix))[-1])
    assert "Rain in Oslo all week." in sent
    assert call.call_id in sent
    assert "museums first" not in sent
