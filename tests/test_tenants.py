"""Tenants: API keys, isolation of every object (another tenant's id is a plain 404), limits on input."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.config import load_settings
from runs.ids import new_id
from tests.conftest import Gateway, eventually, serve_gateway
from tests.helpers import keys_with_prefix

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-fedcba9876543210"
KEY_LIMITED = "sk-tenant-c-limited-000000"


@pytest.fixture
async def tenants(
    monkeypatch: pytest.MonkeyPatch, shared_redis_url: str, simulator_url: str, key_prefix: str
) -> AsyncIterator[dict[str, Any]]:
    """A gateway with auth on: tenant A (key from the environment), B (key given by its hash), C (1 run at once)."""
    monkeypatch.setenv("TEST_KEY_A", KEY_A)
    settings = load_settings(
        storage={"url": shared_redis_url, "key_prefix": key_prefix},
        upstreams=[{"name": "sim", "base_url": f"{simulator_url}/v1", "max_retries": 0}],
        server={"max_body_bytes": 4096},
        auth={
            "enabled": True,
            "keys": [
                {"tenant": "a", "key_env": "TEST_KEY_A"},
                {"tenant": "b", "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest()},
                {
                    "tenant": "c",
                    "key_sha256": hashlib.sha256(KEY_LIMITED.encode()).hexdigest(),
                    "max_concurrent_runs": 1,
                },
            ],
        },
    )
    async with serve_gateway(settings) as gateway:
        clients = {
            name: openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
            for name, key in (("a", KEY_A), ("b", KEY_B), ("c", KEY_LIMITED))
        }
        yield {"gateway": gateway, **clients}
        for client in clients.values():
            await client.close()


async def test_missing_or_wrong_keys_are_401(tenants: dict[str, Any]) -> None:
    gateway: Gateway = tenants["gateway"]
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY_A}"}):
        async with gateway.http.post("/v1/responses", json={"model": "sim-1", "input": "x"}, headers=headers) as reply:
            assert reply.status == 401
            error = (await reply.json())["error"]
            assert set(error) == {"message", "type", "param", "code"}
    wrong = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-nope", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await wrong.responses.create(model="sim-1", input="x")
    finally:
        await wrong.close()
    async with gateway.http.get("/healthz") as reply:  # probes need no key
        assert reply.status == 200


async def raw(gateway: Gateway, method: str, path: str, key: str, **kwargs: Any) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    async with gateway.http.request(method, path, headers=headers, **kwargs) as reply:
        return reply.status, await reply.read()


async def test_another_tenants_objects_are_indistinguishable_from_missing_ones(
    tenants: dict[str, Any], simulator_url: str
) -> None:
    """Done-when: tenant B gets byte-identical 404s for each of A's objects on every route, with no side
    effect (A's run keeps going, nothing deleted)."""
    gateway: Gateway = tenants["gateway"]
    a: openai.AsyncOpenAI = tenants["a"]
    finished = await a.responses.create(model="sim-1", input="A's finished response", background=True)
    conversation = await a.conversations.create(items=[{"role": "user", "content": "A's item"}])
    running = await a.responses.create(
        model="sim-1",
        input="A's running response",
        background=True,
        conversation=conversation.id,
        metadata={"sim_token_delay_ms": "50"},
    )
    item_id = (await a.conversations.items.list(conversation.id)).data[0].id
    missing_response, missing_conversation = new_id("resp"), new_id("conv")

    def routes(response_id: str, conversation_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        body = {"model": "sim-1", "input": "x"}
        return [
            ("GET", f"/v1/responses/{response_id}", {}),
            ("GET", f"/v1/responses/{response_id}?stream=true", {}),
            ("POST", f"/v1/responses/{response_id}/cancel", {}),
            ("DELETE", f"/v1/responses/{response_id}", {}),
            ("GET", f"/v1/responses/{response_id}/input_items", {}),
            ("POST", "/v1/responses", {"json": {**body, "previous_response_id": response_id}}),
            ("POST", "/v1/responses", {"json": {**body, "conversation": conversation_id}}),
            ("GET", f"/v1/conversations/{conversation_id}", {}),
            ("POST", f"/v1/conversations/{conversation_id}", {"json": {"metadata": {"x": "y"}}}),
            ("GET", f"/v1/conversations/{conversation_id}/items", {}),
            (
                "POST",
                f"/v1/conversations/{conversation_id}/items",
                {"json": {"items": [{"role": "user", "content": "x"}]}},
            ),
            ("GET", f"/v1/conversations/{conversation_id}/items/{item_id}", {}),
            ("DELETE", f"/v1/conversations/{conversation_id}/items/{item_id}", {}),
            ("GET", f"/v1/conversations/{conversation_id}/active_response", {}),
            ("GET", f"/v1/conversations/{conversation_id}/active_response?stream=true", {}),
            ("DELETE", f"/v1/conversations/{conversation_id}", {}),
        ]

    for response_id in (running.id, finished.id):
        theirs = routes(response_id, conversation.id)
        nobodys = routes(missing_response, missing_conversation)
        for (method, path, kwargs), (_, missing_path, missing_kwargs) in zip(theirs, nobodys, strict=True):
            status, body = await raw(gateway, method, path, KEY_B, **kwargs)
            missing_status, missing_body = await raw(gateway, method, missing_path, KEY_B, **missing_kwargs)
            expected = missing_body.replace(missing_response.encode(), response_id.encode()).replace(
                missing_conversation.encode(), conversation.id.encode()
            )
            assert (status, body) == (missing_status, expected), (method, path)
            assert status == 404, (method, path, body)

    # Nothing happened to A's objects.
    async def completed() -> bool:
        return (await a.responses.retrieve(running.id)).status == "completed"

    await eventually(completed)
    assert (await a.responses.retrieve(finished.id)).id == finished.id
    assert (await a.conversations.retrieve(conversation.id)).metadata == {}
    items = [item async for item in a.conversations.items.list(conversation.id, order="asc")]
    assert [item.role for item in items] == ["user", "user", "assistant"]  # A's own turn joined; B added nothing


async def test_idempotency_keys_of_tenants_are_independent(tenants: dict[str, Any]) -> None:
    headers = {"Idempotency-Key": "shared-key"}
    from_a = await tenants["a"].responses.create(model="sim-1", input="A's body", extra_headers=headers)
    from_b = await tenants["b"].responses.create(model="sim-1", input="B's body", extra_headers=headers)
    assert from_a.id != from_b.id
    again_a = await tenants["a"].responses.create(model="sim-1", input="A's body", extra_headers=headers)
    assert again_a.id == from_a.id


async def test_per_tenant_concurrent_runs_limit(tenants: dict[str, Any]) -> None:
    c: openai.AsyncOpenAI = tenants["c"]
    running = await c.responses.create(model="sim-1", input="hang", background=True, metadata={"sim_fault": "hang"})
    with pytest.raises(openai.RateLimitError) as refused:
        await c.responses.create(model="sim-1", input="second", background=True)
    assert refused.value.response.headers["Retry-After"] == "1"
    assert (await tenants["a"].responses.create(model="sim-1", input="others unaffected")).status == "completed"
    await c.responses.cancel(running.id)


async def test_oversized_bodies_are_413_with_content_length_and_chunked(tenants: dict[str, Any]) -> None:
    gateway: Gateway = tenants["gateway"]
    big = orjson.dumps({"model": "sim-1", "input": "x" * 10_000})
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    async with gateway.http.post("/v1/responses", data=big, headers=headers) as reply:
        assert reply.status == 413
        assert (await reply.json())["error"]["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    async with gateway.http.post("/v1/responses", data=chunks(), headers=headers) as reply:
        assert reply.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert reply.status == 413
        assert (await reply.json())["error"]["type"] == "invalid_request_error"


async def test_wrong_types_are_400_and_unknown_fields_are_accepted(tenants: dict[str, Any]) -> None:
    gateway: Gateway = tenants["gateway"]
    status, body = await raw(
        gateway, "POST", "/v1/responses", KEY_A, json={"model": "sim-1", "input": "x", "top_p": "1"}
    )
    assert status == 400
    assert orjson.loads(body)["error"]["param"] == "top_p"
    status, _ = await raw(
        gateway, "POST", "/v1/responses", KEY_A, json={"model": "sim-1", "input": "x", "novel_field": 1}
    )
    assert status == 200


async def test_no_raw_key_in_redis_or_logs(
    tenants: dict[str, Any],
    shared_redis_client: aioredis.Redis | RedisCluster,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    a: openai.AsyncOpenAI = tenants["a"]
    conversation = await a.conversations.create(items=[{"role": "user", "content": "hello"}])
    await a.responses.create(
        model="sim-1", input="hi", conversation=conversation.id, extra_headers={"Idempotency-Key": "k1"}
    )
    async with a.responses.stream(model="sim-1", input="stream") as stream:
        await stream.get_final_response()
    await tenants["b"].responses.create(model="sim-1", input="hi from b")
    wrong = openai.AsyncOpenAI(base_url=f"{tenants['gateway'].url}/v1", api_key=KEY_A + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.responses.create(model="sim-1", input="x")
    await wrong.close()

    dump = b""
    for key in await keys_with_prefix(shared_redis_client, key_prefix):
        kind = (await shared_redis_client.type(key)).decode()
        if kind == "string":
            dump += await shared_redis_client.get(key) or b""
        elif kind == "hash":
            dump += orjson.dumps({k.decode(): v.decode() for k, v in (await shared_redis_client.hgetall(key)).items()})
        elif kind == "stream":
            entries = await shared_redis_client.xrange(key)
            # The cluster client of the tests keeps XRANGE's raw reply (flat field lists), as the store reads it.
            fields = [f if isinstance(f, dict) else dict(zip(f[::2], f[1::2], strict=True)) for _, f in entries]
            dump += orjson.dumps(
                [
                    [i.decode(), {k.decode(): v.decode() for k, v in f.items()}]
                    for (i, _), f in zip(entries, fields, strict=True)
                ]
            )
        elif kind == "list":
            dump += b"".join(await shared_redis_client.lrange(key, 0, -1))
        elif kind == "zset":
            dump += b"".join(await shared_redis_client.zrange(key, 0, -1))
        dump += key
    assert len(dump) > 1000  # the dump really has the run's data in it
    logs = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (KEY_A, KEY_B, KEY_LIMITED):
        assert secret.encode() not in dump
        assert secret not in logs
