"""Clients we did not write, against the gateway's defaults (the built-in simulated model) over both upstream
kinds: the SDK's `responses.parse`, continuing an `incomplete` response, and the OpenAI Agents SDK's tool loop
and structured output, in both of its history modes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from pydantic import BaseModel

from gateway.config import load_settings
from tests.conftest import Gateway, serve_gateway

# The Agents SDK would otherwise send its traces to OpenAI.
set_tracing_disabled(True)


class Forecast(BaseModel):
    city: str
    degrees: int
    sunny: bool


@pytest.fixture(params=["defaults", "responses", "chat"])
async def sdk_gateway(request: pytest.FixtureRequest, simulator_url: str) -> AsyncIterator[Gateway]:
    """`make run`'s configuration (nothing configured: the embedded store and the built-in simulated model), or
    the simulator as a Responses or a Chat upstream, on Redis."""
    if request.param == "defaults":
        settings = load_settings()
    else:
        upstream: dict[str, Any] = {"name": "sim", "kind": request.param, "base_url": f"{simulator_url}/v1"}
        redis_url = request.getfixturevalue("redis_server")
        settings = load_settings(storage={"url": redis_url}, upstreams=[{**upstream, "max_retries": 0}])
    async with serve_gateway(settings) as served:
        yield served


async def test_parse_gives_a_model_instance(sdk_gateway: Gateway) -> None:
    parsed = await sdk_gateway.client.responses.parse(model="sim-1", input="Forecast for Oslo?", text_format=Forecast)
    assert isinstance(parsed.output_parsed, Forecast)
    stored = await sdk_gateway.client.responses.retrieve(parsed.id)
    assert stored.text is not None
    assert stored.text.format is not None
    assert stored.text.format.type == "json_schema"  # the request's format, echoed


async def test_an_incomplete_response_is_continued(sdk_gateway: Gateway) -> None:
    client = sdk_gateway.client
    cut = await client.responses.create(model="sim-1", input="Tell me a long story.", max_output_tokens=3)
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text
    more = await client.responses.create(model="sim-1", previous_response_id=cut.id, input="Go on.")
    assert more.status == "completed"
    items = [item async for item in client.responses.input_items.list(more.id)]
    assert items  # the continuation's own input, listed


def weather_agent(gateway: Gateway, asked: list[str]) -> Agent[Any]:
    """An agent with one tool, served by `gateway`; each city the tool is asked about goes into `asked`."""

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"Sunny in {city}."

    return Agent(
        name="weather",
        instructions="Use the tool to answer.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model="sim-1", openai_client=gateway.client),
    )


async def test_an_agent_calls_its_tool_and_answers(sdk_gateway: Gateway) -> None:
    asked: list[str] = []
    agent = weather_agent(sdk_gateway, asked)
    result = await Runner.run(agent, "What is the weather in Oslo?", max_turns=4)
    assert len(asked) == 1
    assert asked[0]
    assert isinstance(result.final_output, str)
    assert result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]

    # The same loop with the gateway keeping the history (previous_response_id between turns).
    asked.clear()
    chained = await Runner.run(agent, "And in Bergen?", max_turns=4, auto_previous_response_id=True)
    assert len(asked) == 1
    assert chained.last_response_id is not None
    last = await sdk_gateway.client.responses.retrieve(chained.last_response_id)
    assert last.previous_response_id is not None
    assert last.status == "completed"


async def test_a_streamed_agent_gets_every_event_of_each_turn(sdk_gateway: Gateway) -> None:
    """The Agents SDK's streamed mode reads each turn's SSE itself: the tool turn and the answer turn arrive whole,
    numbered without a gap, and the text the agent reports is the deltas it was streamed."""
    asked: list[str] = []
    agent = weather_agent(sdk_gateway, asked)
    streamed = Runner.run_streamed(agent, "What is the weather in Oslo?", max_turns=4)
    turns: list[list[Any]] = []
    async for event in streamed.stream_events():
        if event.type != "raw_response_event":
            continue
        if event.data.type == "response.created":
            turns.append([])
        turns[-1].append(event.data)
    assert len(asked) == 1
    assert [[event.type for event in turn][-1] for turn in turns] == ["response.completed", "response.completed"]
    for turn in turns:
        numbers = [event.sequence_number for event in turn]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    answer = "".join(event.delta for event in turns[-1] if event.type == "response.output_text.delta")
    assert answer
    assert streamed.final_output == answer
    stored = await sdk_gateway.client.responses.retrieve(turns[-1][-1].response.id)
    assert stored.output_text == answer


async def test_an_agent_with_structured_output(sdk_gateway: Gateway) -> None:
    agent = Agent(
        name="forecaster",
        instructions="Answer with a forecast.",
        output_type=Forecast,
        model=OpenAIResponsesModel(model="sim-1", openai_client=sdk_gateway.client),
    )
    result = await Runner.run(agent, "Forecast for Tromsø?")
    assert isinstance(result.final_output, Forecast)


async def test_compact_and_count_tokens(sdk_gateway: Gateway) -> None:
    client = sdk_gateway.client
    earlier: Any = [
        {"role": "user", "content": "Plan a weekend in Rome."},
        {"role": "assistant", "content": "Day one: the Forum."},
    ]
    compacted = await client.responses.with_raw_response.compact(model="sim-1", input=earlier)
    window = orjson.loads(compacted.content)["output"]
    assert [item["type"] for item in window] == ["message", "compaction"]
    counted = await client.responses.input_tokens.count(model="sim-1", input=[*window, _NEXT])
    answered = await client.responses.create(model="sim-1", input=[*window, _NEXT])
    assert answered.status == "completed"
    assert answered.usage is not None
    assert counted.input_tokens == answered.usage.input_tokens  # counted as the model then read it


_NEXT: Any = {"role": "user", "content": "And day two?"}
