"""Webhooks as a user of OpenAI's would check them: a receiver that verifies each delivery with the SDK's own
`client.webhooks.unwrap(...)` and the endpoint's secret, retries after a failed attempt, filters by event and
tenant, and a delivery owed by an instance killed right after the response ended, made once by another."""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.exceptions import ResponseError

from gateway.app import create_app
from gateway.config import ConfigError
from runs.faults import KILL_AT_ENV
from runs.webhooks import Delivery, WebhookEndpoint, WebhookSender, WebhookSettings, event_id
from storage.base import OutboxEntry, StoredEvent
from storage.memory import MemoryStore
from tests.conftest import (
    Gateway,
    GatewayProcess,
    eventually,
    gateway_settings,
    redis_gateway_env,
    serve_gateway,
)
from tests.helpers import keys_with_prefix, sdk_for
from tests.test_metrics import scrape, value
from tests.test_storage_contract import LEASE, new_response

SECRET_ENV = "TEST_WEBHOOK_SECRET"
FAST = {"poll_seconds": 0.1, "first_retry_seconds": 0.3, "timeout_seconds": 2.0}


@dataclass
class Receiver:
    """A webhook receiver: it records every attempt and answers with the planned statuses (then 200)."""

    url: str
    attempts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    planned: list[int] = field(default_factory=list)

    def deliveries(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for headers, body in self.attempts if headers["x-answered"] == "200"]

    async def delivered(self) -> bool:
        return bool(self.deliveries())

    async def attempted(self) -> bool:
        return bool(self.attempts)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver(url="")

    async def receive(request: web.Request) -> web.Response:
        status = state.planned.pop(0) if state.planned else 200
        headers = {name.lower(): value for name, value in request.headers.items()} | {"x-answered": str(status)}
        state.attempts.append((headers, await request.read()))
        return web.Response(status=status, text="ok" if status == 200 else "down")

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = str(server.make_url("/hook"))
    yield state
    await server.close()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv(SECRET_ENV, value)
    return value


def endpoint(url: str, name: str = "hook", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "secret_env": SECRET_ENV, **extra}


def quick(tag: str, tokens: int = 3) -> dict[str, str]:
    return {"sim_tag": tag, "sim_tokens": str(tokens), "sim_token_delay_ms": "1"}


async def webhook_gateway(storage_url: str, simulator_url: str, key_prefix: str, *endpoints: dict[str, Any]) -> Any:
    settings = gateway_settings(
        storage_url=storage_url,
        simulator_url=simulator_url,
        key_prefix=key_prefix,
        webhooks={"endpoints": list(endpoints), **FAST},
    )
    return serve_gateway(settings)


async def test_a_background_response_that_ends_is_announced_and_the_sdk_verifies_it(
    storage_url: str, simulator_url: str, key_prefix: str, receiver: Receiver, secret: str
) -> None:
    async with await webhook_gateway(storage_url, simulator_url, key_prefix, endpoint(receiver.url)) as gateway:
        # A synchronous response owes nothing (as at OpenAI: webhooks announce background responses).
        synchronous = await gateway.client.responses.create(model="sim-1", input="hi", metadata=quick(key_prefix))
        created = await gateway.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=quick(key_prefix)
        )
        await eventually(receiver.delivered, within=10)
        await asyncio.sleep(0.3)  # nothing else follows
    assert synchronous.status == "completed"
    assert len(receiver.attempts) == 1
    headers, body = receiver.attempts[0]
    event = gateway.client.webhooks.unwrap(body, headers, secret=secret)
    assert event.type == "response.completed"
    assert event.data.id == created.id
    assert event.id.startswith("evt_")
    assert headers["webhook-id"].startswith("wh_")
    assert headers["content-type"] == "application/json"
    # The verification can fail: another secret, or a body changed on the way.
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(openai.InvalidWebhookSignatureError):
        gateway.client.webhooks.unwrap(body, headers, secret=other)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        gateway.client.webhooks.unwrap(body.replace(created.id.encode(), b"resp_other"), headers, secret=secret)


async def test_a_failed_attempt_is_retried_with_the_same_webhook_id(
    shared_redis_url: str,
    simulator_url: str,
    key_prefix: str,
    receiver: Receiver,
    secret: str,
    shared_redis_client: Any,
) -> None:
    receiver.planned = [500]
    async with await webhook_gateway(shared_redis_url, simulator_url, key_prefix, endpoint(receiver.url)) as gateway:
        created = await gateway.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=quick(key_prefix)
        )
        await eventually(receiver.attempted, within=10)
        # Owed and not yet delivered, it waits in its shard's outbox, which has a TTL like every key.
        outboxes = [
            key for key in await keys_with_prefix(shared_redis_client, key_prefix) if key.endswith(b":webhooks")
        ]
        assert len(outboxes) == 1
        assert 0 < await shared_redis_client.pttl(outboxes[0]) <= 600_000
        await eventually(receiver.delivered, within=10)
        await asyncio.sleep(0.5)
        assert [key for key in await keys_with_prefix(shared_redis_client, key_prefix) if b"webhooks" in key] == []
        samples = await scrape(gateway.http)  # the delivery's status, in the metrics
        deliveries = "gateway_webhook_deliveries_total"
        assert (value(samples, deliveries, result="retried"), value(samples, deliveries, result="delivered")) == (1, 1)
    assert [headers["x-answered"] for headers, _ in receiver.attempts] == ["500", "200"]
    (first, first_body), (second, second_body) = receiver.attempts
    assert first["webhook-id"] == second["webhook-id"]
    assert first_body == second_body
    assert gateway.client.webhooks.unwrap(second_body, second, secret=secret).data.id == created.id


async def test_endpoints_get_only_the_events_and_tenants_they_asked_for(
    simulator_url: str, redis_server: str, key_prefix: str, receiver: Receiver, secret: str
) -> None:
    cancelled_only = endpoint(receiver.url + "?only=cancelled", name="cancels", events=["response.cancelled"])
    elsewhere = endpoint(receiver.url + "?only=other", name="other-tenant", tenants=["someone-else"])
    async with await webhook_gateway(redis_server, simulator_url, key_prefix, cancelled_only, elsewhere) as gateway:
        done = await gateway.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=quick(key_prefix)
        )
        await eventually(lambda: _status(gateway, done.id, "completed"), within=10)
        slow = await gateway.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=quick(key_prefix, tokens=400)
        )
        await gateway.client.responses.cancel(slow.id)
        await eventually(receiver.delivered, within=10)
        await asyncio.sleep(0.3)
    assert len(receiver.attempts) == 1
    headers, body = receiver.attempts[0]
    event = gateway.client.webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id) == ("response.cancelled", slow.id)


async def _status(gateway: Gateway, response_id: str, status: str) -> bool:
    return (await gateway.client.responses.retrieve(response_id)).status == status


async def test_a_webhook_owed_by_an_instance_killed_right_after_the_end_is_delivered_once_by_another(
    start_gateway_process: Callable[..., GatewayProcess],
    redis_server: str,
    simulator_url: str,
    key_prefix: str,
    receiver: Receiver,
    secret: str,
) -> None:
    """A real process SIGKILLs itself right after the terminal event is stored, before anything else: the
    delivery it owed was written with that event, and the other instance's sender makes it, once."""
    hooks = orjson.dumps([endpoint(receiver.url)]).decode()
    env = redis_gateway_env(
        redis_server,
        simulator_url,
        key_prefix,
        GATEWAY_WEBHOOKS__ENDPOINTS=hooks,
        GATEWAY_WEBHOOKS__POLL_SECONDS="0.1",
        # Should the dying instance have claimed the delivery first, the claim lapses within 2 x 1 + 5 s.
        GATEWAY_WEBHOOKS__TIMEOUT_SECONDS="1",
        **{SECRET_ENV: secret},
    )
    a = start_gateway_process({**env, KILL_AT_ENV: "finish.terminal_stored"})
    b = start_gateway_process(env)
    client = sdk_for(a.url)
    created = await client.responses.create(model="sim-1", input="hi", background=True, metadata=quick(key_prefix))
    await client.close()
    await asyncio.to_thread(a.process.wait, 20)
    assert a.process.returncode == -signal.SIGKILL
    await eventually(receiver.delivered, within=15)
    await asyncio.sleep(1.0)  # a second delivery would come within a few polls
    assert len(receiver.attempts) == 1
    headers, body = receiver.attempts[0]
    event = openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id) == ("response.completed", created.id)
    assert "delivered to hook" in b.log()


def test_an_endpoint_without_its_secret_or_with_a_bad_one_stops_the_start(
    simulator_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gateway_settings(
        storage_url="memory://", simulator_url=simulator_url, webhooks={"endpoints": [endpoint("http://x/hook")]}
    )
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{SECRET_ENV}.*is not set"):
        create_app(settings)
    monkeypatch.setenv(SECRET_ENV, "whsec_not*base64")
    with pytest.raises(ConfigError, match="not valid base64"):
        create_app(settings)
    with pytest.raises(ConfigError, match=r"webhooks\.endpoints\.0\.url"):
        gateway_settings(
            storage_url="memory://", simulator_url=simulator_url, webhooks={"endpoints": [endpoint("ftp://x")]}
        )


async def test_the_sender_outlives_a_store_that_answers_with_errors(receiver: Receiver, secret: str) -> None:
    """A Redis still loading its AOF, or read-only after a failover, answers with an error reply: the sender
    goes on and delivers once the store answers again."""
    store = MemoryStore(retention_seconds=60)
    await store.create_response(new_response("resp_flaky", events=1))
    completed = "response.completed"
    entry = Delivery("hook", event_id("resp_flaky", completed), completed, "resp_flaky", int(time.time())).entry()
    done = [StoredEvent(1, "response.completed", b"{}")]
    await store.append_events("resp_flaky", done, snapshot=b"{}", status="completed", lease=LEASE, outbox=[entry])
    failures = [ResponseError("LOADING Redis is loading the dataset in memory")] * 3

    class Flaky:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def due_webhooks(self, limit: int, *, claim_ms: int) -> list[OutboxEntry]:
            if failures:
                raise failures.pop()
            return await store.due_webhooks(limit, claim_ms=claim_ms)

    settings = WebhookSettings(endpoints=(WebhookEndpoint("hook", receiver.url, secret),), poll_seconds=0.05)
    sender = WebhookSender(Flaky(), settings)  # type: ignore[arg-type]
    sender.start()
    try:
        await eventually(receiver.delivered, within=10)
    finally:
        await sender.close()
    assert failures == []
