"""Idempotency-Key: the fingerprint, the key rules, and one run per key across retries and instances."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import openai
import pytest

from runs.idempotency import check_key, fingerprint
from runs.request import CreateResponseRequest
from tests.conftest import Gateway, GatewayProcess, eventually, gateway_settings, redis_gateway_env, serve_gateway
from tests.helpers import expected_text, read_frames, upstream_calls


def build(**fields: Any) -> CreateResponseRequest:
    return CreateResponseRequest.model_validate({"model": "sim-1", "input": "hello", **fields})


def test_the_same_request_built_twice_has_the_same_fingerprint() -> None:
    body = {"model": "m", "input": [{"role": "user", "content": "hi"}], "metadata": {"a": "1", "b": "2"}}
    reordered = {"metadata": {"b": "2", "a": "1"}, "input": [{"content": "hi", "role": "user"}], "model": "m"}
    first = fingerprint(CreateResponseRequest.model_validate(body))
    assert first == fingerprint(CreateResponseRequest.model_validate(body))
    assert first == fingerprint(CreateResponseRequest.model_validate(reordered))
    assert len(first) == 64


@pytest.mark.parametrize(
    "explicit",
    [
        {"store": True},
        {"background": False},
        {"parallel_tool_calls": True},
        {"tool_choice": "auto"},
        {"truncation": "disabled"},
        {"metadata": {}},
        {"tools": []},
        {"instructions": None},
        {"stream": True},
        {"stream": True, "stream_options": {"include_obfuscation": False}},
    ],
)
def test_defaults_and_delivery_options_do_not_change_the_fingerprint(explicit: dict[str, Any]) -> None:
    assert fingerprint(build(**explicit)) == fingerprint(build())


@pytest.mark.parametrize(
    "changed",
    [{"input": "hello!"}, {"model": "sim-2"}, {"temperature": 0.5}, {"background": True}, {"metadata": {"a": "1"}}],
)
def test_what_is_asked_changes_the_fingerprint(changed: dict[str, Any]) -> None:
    assert fingerprint(build(**changed)) != fingerprint(build())


@pytest.mark.parametrize("key", ["a", "k" * 255, "order-2026-11-22/42", "with spaces and ~!"])
def test_valid_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "line\nbreak", "cr\rhere", "caf\u00e9", "\x7f"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(Exception, match="Idempotency-Key"):
        check_key(key)


async def test_a_bad_key_is_refused_before_anything_else(gateway: Gateway) -> None:
    headers = {"Idempotency-Key": "k" * 256, "Content-Type": "application/json"}
    async with gateway.http.post("/v1/responses", data=b"{not json", headers=headers) as reply:
        assert reply.status == 400
        error = (await reply.json())["error"]
    assert error["param"] == "Idempotency-Key"
    assert error["code"] == "invalid_idempotency_key"


async def test_a_key_with_store_false_is_refused(gateway: Gateway, simulator_url: str, key_prefix: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client.responses.create(
            model="sim-1",
            input="x",
            store=False,
            metadata={"sim_tag": key_prefix},
            extra_headers={"Idempotency-Key": "unstored"},
        )
    assert caught.value.code == "idempotency_requires_store"
    assert await upstream_calls(simulator_url, key_prefix) == 0


async def test_a_retry_gets_the_same_response_without_a_second_run(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    arguments: dict[str, Any] = {
        "model": "sim-1",
        "input": "once only",
        "metadata": {"sim_tag": key_prefix},
        "extra_headers": {"Idempotency-Key": "retry-1"},
    }
    first = await gateway.client.responses.with_raw_response.create(**arguments)
    again = await gateway.client.responses.with_raw_response.create(**arguments)
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.parse().model_dump() == first.parse().model_dump()
    assert await upstream_calls(simulator_url, key_prefix) == 1


async def test_a_background_retry_returns_the_current_snapshot(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    arguments: dict[str, Any] = {
        "model": "sim-1",
        "input": "background once",
        "background": True,
        "metadata": {"sim_tag": key_prefix, "sim_token_delay_ms": "20"},
        "extra_headers": {"Idempotency-Key": "bg-1"},
    }
    first = await gateway.client.responses.create(**arguments)
    again = await gateway.client.responses.create(**arguments)
    assert again.id == first.id
    assert again.status in ("queued", "in_progress", "completed")

    async def completed() -> bool:
        return (await gateway.client.responses.retrieve(first.id)).status == "completed"

    await eventually(completed)  # the background run reaches the simulator only after the POST returned
    assert await upstream_calls(simulator_url, key_prefix) == 1


async def test_same_key_different_body_is_a_422_and_starts_nothing(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    headers = {"Idempotency-Key": "reused"}
    await gateway.client.responses.create(
        model="sim-1", input="first body", metadata={"sim_tag": key_prefix}, extra_headers=headers
    )
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await gateway.client.responses.create(
            model="sim-1", input="second body", metadata={"sim_tag": key_prefix}, extra_headers=headers
        )
    assert caught.value.code == "idempotency_key_reused"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert await upstream_calls(simulator_url, key_prefix) == 1


async def test_a_request_that_fails_validation_stores_nothing_under_its_key(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    headers = {"Idempotency-Key": "validated"}
    with pytest.raises(openai.BadRequestError):
        await gateway.client.responses.create(
            model="sim-1", input="x", temperature=5, metadata={"sim_tag": key_prefix}, extra_headers=headers
        )
    # The key is still free: a different, valid body may use it.
    response = await gateway.client.responses.create(
        model="sim-1", input="valid now", metadata={"sim_tag": key_prefix}, extra_headers=headers
    )
    assert response.status == "completed"


async def test_streaming_retry_after_a_disconnect_replays_the_whole_stream_then_follows_it(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    """Done-when: a streaming retry after a disconnect replays the full stream and then follows it live."""
    body = {
        "model": "sim-1",
        "input": "stream once",
        "stream": True,
        "metadata": {"sim_tag": key_prefix, "sim_token_delay_ms": "40"},
    }
    headers = {"Idempotency-Key": "stream-1"}
    async with gateway.http.post("/v1/responses", json=body, headers=headers) as first:
        head = await read_frames(first, limit=4)
    response_id = head[0].data["response"]["id"]  # type: ignore[index]
    async with gateway.http.post("/v1/responses", json=body, headers=headers) as retry:
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert (await gateway.client.responses.retrieve(response_id)).status == "in_progress"  # still live
        frames = await read_frames(retry)
    assert [frame.raw for frame in frames[:4]] == [frame.raw for frame in head]
    assert [frame.number for frame in frames] == list(range(len(frames)))
    assert frames[-1].event == "response.completed"
    text = "".join(f.data["delta"] for f in frames if f.event == "response.output_text.delta")  # type: ignore[index]
    assert text == expected_text("stream once")
    assert await upstream_calls(simulator_url, key_prefix) == 1


async def test_after_the_ttl_the_key_creates_a_new_response(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    settings = gateway_settings(
        storage_url=storage_url, simulator_url=simulator_url, key_prefix=key_prefix, idempotency={"ttl_seconds": 1}
    )
    async with serve_gateway(settings) as gateway:
        arguments: dict[str, Any] = {
            "model": "sim-1",
            "input": "expiring key",
            "metadata": {"sim_tag": key_prefix},
            "extra_headers": {"Idempotency-Key": "short-lived"},
        }
        first = await gateway.client.responses.create(**arguments)
        assert (await gateway.client.responses.create(**arguments)).id == first.id
        await asyncio.sleep(1.3)
        later = await gateway.client.responses.create(**arguments)
        assert later.id != first.id
        assert later.output_text == first.output_text
        assert await upstream_calls(simulator_url, key_prefix) == 2


async def test_fifty_concurrent_posts_with_one_key_over_two_instances_make_one_run(
    start_gateway_process: Callable[..., GatewayProcess], shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Done-when: 50 concurrent identical POSTs with one key, spread over two gateway processes → exactly one
    request reaches the simulator and all 50 get the same response id and the same final text."""
    env = redis_gateway_env(shared_redis_url, simulator_url, key_prefix)
    gateways = [start_gateway_process(env), start_gateway_process(env)]
    clients = [
        openai.AsyncOpenAI(base_url=f"{g.url}/v1", api_key="test-key", max_retries=0, timeout=60) for g in gateways
    ]
    try:
        results = await asyncio.gather(
            *(
                clients[n % 2].responses.create(
                    model="sim-1",
                    input="fifty at once",
                    metadata={"sim_tag": key_prefix, "sim_token_delay_ms": "10"},
                    extra_headers={"Idempotency-Key": f"storm-{key_prefix}"},
                )
                for n in range(50)
            )
        )
    finally:
        for client in clients:
            await client.close()
    assert len({response.id for response in results}) == 1
    assert {response.output_text for response in results} == {expected_text("fifty at once")}
    assert {response.status for response in results} == {"completed"}

    async def counted() -> int:
        return await upstream_calls(simulator_url, key_prefix)

    assert await eventually(counted) == 1


async def test_a_retry_after_an_upstream_refusal_starts_afresh(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    """The first attempt gets the provider's 429; the SDK's own retry, with the same key, gets a new run that
    succeeds, not the failed response replayed with a 200."""
    client = gateway.client.with_options(max_retries=1)
    response = await client.responses.create(
        model="sim-1",
        input="flaky provider",
        metadata={"sim_tag": key_prefix, "sim_fault": "http_429", "sim_fail_first": "1"},
        extra_headers={"Idempotency-Key": "after-refusal"},
    )
    assert response.status == "completed"
    assert await upstream_calls(simulator_url, key_prefix) == 2
