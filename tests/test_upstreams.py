"""Routing to upstreams of both kinds, `/v1/models`, and resilience: retries before output, failure after it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import openai
import pytest

from gateway.config import load_settings
from runs.upstream import retry
from runs.upstream.base import CallTrace, UpstreamFailure, UpstreamSpec
from runs.upstream.retry import stream_with_retries
from tests.conftest import Gateway, serve_gateway
from tests.helpers import expected_text, sim_requests, sim_stats, upstream_calls

KINDS = ["responses", "chat"]


@pytest.fixture
async def routed(simulator_url: str, storage_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    """A gateway with a Chat upstream for `local-*` (and an alias) and a Responses upstream for `gpt-*`."""
    settings = load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix},
        upstreams=[
            {
                "name": "local",
                "kind": "chat",
                "send_metadata": True,  # the simulator reads its knobs from metadata
                "base_url": f"{simulator_url}/v1",
                "models": ["local-*", "sim-*"],
                "model_map": {"fast": "local-fast-v2"},
                "max_retries": 0,
            },
            {"name": "cloud", "kind": "responses", "base_url": f"{simulator_url}/v1", "models": ["gpt-*", "exact-one"]},
        ],
    )
    async with serve_gateway(settings) as gateway:
        yield gateway


async def last_request(simulator_url: str, tag: str) -> dict[str, Any]:
    received = await sim_requests(simulator_url, tag)
    return received[-1]


async def test_models_route_by_glob_and_alias(routed: Gateway, simulator_url: str, key_prefix: str) -> None:
    cases = [("gpt-4o", "cloud", "gpt-4o"), ("local-llama", "local", "local-llama"), ("fast", "local", "local-fast-v2")]
    for model, upstream, provider_model in cases:
        tag = f"{key_prefix}-{model}"
        response = await routed.client.responses.create(model=model, input="route me", metadata={"sim_tag": tag})
        assert response.status == "completed"
        assert response.model == model  # the client's name, whatever the provider calls it
        assert response.output_text == expected_text("route me")
        body = await last_request(simulator_url, tag)
        assert body["model"] == provider_model
        assert ("messages" in body) == (upstream == "local")


async def test_an_unroutable_model_is_a_404_and_stores_nothing(routed: Gateway, simulator_url: str) -> None:
    before = (await sim_stats(simulator_url))["requests"]
    with pytest.raises(openai.NotFoundError) as caught:
        await routed.client.responses.create(model="claude-3", input="x")
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert (await sim_stats(simulator_url))["requests"] == before


async def test_models_lists_what_is_routable(routed: Gateway) -> None:
    listed = {model.id: model.owned_by async for model in routed.client.models.list()}
    # Exact names and aliases, plus what the provider lists that a glob admits (the simulator lists sim-1).
    assert listed == {"fast": "local", "sim-1": "local", "exact-one": "cloud"}
    assert (await routed.client.models.retrieve("gpt-anything")).owned_by == "cloud"
    with pytest.raises(openai.NotFoundError):
        await routed.client.models.retrieve("claude-3")


async def test_a_parameter_chat_cannot_honour_is_a_400_before_anything_is_stored(
    routed: Gateway, simulator_url: str, key_prefix: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await routed.client.responses.create(
            model="local-llama", input="x", tools=[{"type": "web_search"}], metadata={"sim_tag": key_prefix}
        )
    assert caught.value.param == "tools[0]"
    assert await upstream_calls(simulator_url, key_prefix) == 0


async def test_function_calls_over_chat(routed: Gateway, simulator_url: str, key_prefix: str) -> None:
    tools: list[Any] = [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}},
        {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}},
    ]
    async with routed.client.responses.stream(
        model="local-llama", input="weather?", tools=tools, metadata={"sim_tag": key_prefix, "sim_tool_calls": "2"}
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    calls_made = [item for item in final.output if item.type == "function_call"]
    assert [call.name for call in calls_made] == ["get_weather", "get_time"]
    assert kinds.count("response.function_call_arguments.delta") > 2  # arguments arrived in pieces
    body = await last_request(simulator_url, key_prefix)
    assert body["tools"][0] == {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }

    # The next turn sends the calls and their outputs back; the provider sees them as Chat messages.
    follow_up: list[Any] = [
        {"role": "user", "content": "weather?"},
        *[
            {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
            for c in calls_made
        ],
        *[{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls_made],
    ]
    answer = await routed.client.responses.create(
        model="local-llama", input=follow_up, tools=tools, metadata={"sim_tag": key_prefix}
    )
    assert answer.status == "completed"
    messages = (await last_request(simulator_url, key_prefix))["messages"]
    assert [message["role"] for message in messages] == ["user", "assistant", "tool", "tool"]
    assert [call["id"] for call in messages[1]["tool_calls"]] == [c.call_id for c in calls_made]


# Resilience, through the simulator's fault knobs, for both kinds of upstream.


def resilient_settings(simulator_url: str, storage_url: str, key_prefix: str, kind: str) -> Any:
    return load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix},
        upstreams=[
            {
                "name": "sim",
                "kind": kind,
                "send_metadata": True,
                "base_url": f"{simulator_url}/v1",
                "max_retries": 2,
                "retry_backoff_seconds": 0.01,
            }
        ],
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", ["http_503", "http_429", "http_408"])
async def test_retryable_failures_before_output_are_retried(
    simulator_url: str, storage_url: str, key_prefix: str, kind: str, fault: str
) -> None:
    async with serve_gateway(resilient_settings(simulator_url, storage_url, key_prefix, kind)) as gateway:
        response = await gateway.client.responses.create(
            model="sim-1",
            input="retry me",
            metadata={"sim_tag": key_prefix, "sim_fault": fault, "sim_fail_first": "2"},
        )
    assert response.status == "completed"
    assert response.output_text == expected_text("retry me")
    assert await upstream_calls(simulator_url, key_prefix) == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_cut_before_output_is_retried(
    simulator_url: str, storage_url: str, key_prefix: str, kind: str
) -> None:
    async with serve_gateway(resilient_settings(simulator_url, storage_url, key_prefix, kind)) as gateway:
        response = await gateway.client.responses.create(
            model="sim-1",
            input="cut early",
            metadata={"sim_tag": key_prefix, "sim_fail_after": "1", "sim_fail_first": "1"},
        )
    assert response.status == "completed"
    assert await upstream_calls(simulator_url, key_prefix) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_retries_run_out(simulator_url: str, storage_url: str, key_prefix: str, kind: str) -> None:
    async with serve_gateway(resilient_settings(simulator_url, storage_url, key_prefix, kind)) as gateway:
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.client.responses.create(
                model="sim-1", input="always down", metadata={"sim_tag": key_prefix, "sim_fault": "http_500"}
            )
    assert caught.value.status_code == 502
    assert await upstream_calls(simulator_url, key_prefix) == 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("fault", "status"), [("http_400", 400), ("http_401", 502), ("http_404", 502)])
async def test_client_and_credential_errors_are_not_retried(
    simulator_url: str, storage_url: str, key_prefix: str, kind: str, fault: str, status: int
) -> None:
    async with serve_gateway(resilient_settings(simulator_url, storage_url, key_prefix, kind)) as gateway:
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.client.responses.create(
                model="sim-1", input="refused", metadata={"sim_tag": key_prefix, "sim_fault": fault}
            )
    assert caught.value.status_code == status
    assert await upstream_calls(simulator_url, key_prefix) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failure_after_output_is_final_and_keeps_the_partial_output(
    simulator_url: str, storage_url: str, key_prefix: str, kind: str
) -> None:
    async with serve_gateway(resilient_settings(simulator_url, storage_url, key_prefix, kind)) as gateway:
        stream = await gateway.client.responses.create(
            model="sim-1", input="crash later", stream=True, metadata={"sim_tag": key_prefix, "sim_fail_after": "9"}
        )
        events = [event async for event in stream]
        stored = await gateway.client.responses.retrieve(events[0].response.id)  # type: ignore[union-attr]
    assert events[-1].type == "response.failed"
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas
    assert expected_text("crash later").startswith(deltas)
    assert stored.status == "failed"
    assert stored.output_text == deltas
    assert await upstream_calls(simulator_url, key_prefix) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_length_and_usage_over_both_kinds(
    simulator_url: str, storage_url: str, key_prefix: str, kind: str
) -> None:
    async with serve_gateway(resilient_settings(simulator_url, storage_url, key_prefix, kind)) as gateway:
        capped = await gateway.client.responses.create(model="sim-1", input="long", max_output_tokens=16)
        whole = await gateway.client.responses.create(model="sim-1", input="short", metadata={"sim_tokens": "5"})
    assert capped.status == "incomplete"
    assert capped.incomplete_details is not None
    assert capped.incomplete_details.reason == "max_output_tokens"
    assert whole.usage is not None
    assert whole.usage.output_tokens == 5
    assert whole.output_text == expected_text("short", tokens=5)


# The retry policy itself.


class FlakyUpstream:
    """An upstream stand-in (no Redis involved) failing a set number of times before it answers."""

    def __init__(self, failures: list[UpstreamFailure], *, emit_before_failing: bool = False) -> None:
        self.spec = UpstreamSpec(name="flaky", kind="responses", base_url="http://unused", max_retries=3)
        self._failures = failures
        self._emit_before_failing = emit_before_failing
        self.attempts = 0

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        return body

    async def stream_turn(
        self, body: dict[str, Any], *, api_key: str | None = None, call: CallTrace | None = None
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        self.attempts += 1
        yield [{"type": "response.created"}]
        if self._failures:
            if self._emit_before_failing:
                yield [{"type": "response.output_text.delta", "delta": "x"}]
            raise self._failures.pop(0)
        yield [{"type": "response.completed", "response": {}}]

    async def list_models(self) -> list[str]:
        return []

    async def close(self) -> None:
        return None


async def test_retry_after_is_honoured_and_backoff_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(retry.asyncio, "sleep", record_sleep)
    upstream = FlakyUpstream(
        [
            UpstreamFailure("rate limited", status=429, retryable=True, retry_after_seconds=1.5),
            UpstreamFailure("down", status=503, retryable=True),
            UpstreamFailure("way too long", status=429, retryable=True, retry_after_seconds=3600),
        ]
    )
    events = [event async for events in stream_with_retries(upstream, {}) for event in events]
    assert events[-1]["type"] == "response.completed"
    assert upstream.attempts == 4
    assert slept[0] == 1.5
    assert 0 <= slept[1] <= min(0.5 * 2, retry.MAX_BACKOFF_SECONDS)
    assert slept[2] == retry.MAX_RETRY_AFTER_SECONDS


async def test_no_retry_once_output_was_emitted() -> None:
    upstream = FlakyUpstream([UpstreamFailure("cut", retryable=True)], emit_before_failing=True)
    with pytest.raises(UpstreamFailure):
        _ = [event async for events in stream_with_retries(upstream, {}) for event in events]
    assert upstream.attempts == 1
