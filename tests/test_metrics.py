"""`/metrics`: Prometheus text that parses, counters that move as requests are driven, bounded labels, a registry per
app, and the separate port."""

from __future__ import annotations

import asyncio
import re
import uuid

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import MetricsConfig, Settings
from gateway.metrics import METRICS, GatewayMetrics
from storage.metrics import LoopCounter, LoopHistogram, steps_1_2_5
from tests.conftest import Gateway, eventually, gateway_settings, serve_gateway
from tests.test_lifecycle_faults import frozen_at, instance

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ROUTE = "/v1/responses/{response_id}"


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(http: aiohttp.ClientSession, url: str = "/metrics") -> Samples:
    async with http.get(url) as reply:
        assert reply.status == 200, await reply.text()
        assert reply.content_type == "text/plain"
        return parse(await reply.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def tag() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


async def test_counters_move_as_requests_are_driven(single_node_gateway: Gateway) -> None:
    """One streamed create, a 404, an idempotent replay, a failed background run and a stream the client leaves:
    each shows in the counters it should, under route templates and statuses, never under an id."""
    gateway = single_node_gateway
    client = gateway.client
    before = await scrape(gateway.http)

    # Tokens far enough apart to arrive in separate reads even on a loaded machine (each read is one write).
    paced = {"sim_tokens": "8", "sim_token_delay_ms": "25"}
    created = await client.responses.create(model="sim-1", input="count", stream=True, metadata=paced)
    events = [event async for event in created]
    response_id = events[-1].response.id  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_does_not_exist")
    key = {"Idempotency-Key": tag()}
    first = await client.responses.create(model="sim-1", input="once", extra_headers=key)
    again = await client.responses.create(model="sim-1", input="once", extra_headers=key)
    assert again.id == first.id
    failing = await client.responses.create(
        model="sim-1", input="fail", background=True, metadata={"sim_fault": "http_500"}
    )
    async with client.responses.stream(
        model="sim-1", input="leave", metadata={"sim_tokens": "500", "sim_token_delay_ms": "5"}
    ) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                break

    async def ended() -> Samples | None:
        after = await scrape(gateway.http)
        failed = moved(before, after, "gateway_runs_finished_total", status="failed")
        dropped = moved(before, after, "gateway_subscribers_dropped_total", reason="disconnected")
        return after if failed >= 1 and dropped >= 1 else None

    after = await eventually(ended)
    assert (await client.responses.retrieve(failing.id)).status == "failed"

    assert moved(before, after, "gateway_http_requests_total", route="/v1/responses", method="POST", status="200") >= 4
    assert moved(before, after, "gateway_http_requests_total", route=ROUTE, method="GET", status="404") == 1
    assert moved(before, after, "gateway_http_request_duration_seconds_count", route=ROUTE, method="GET") >= 1
    assert moved(before, after, "gateway_runs_finished_total", status="completed") >= 2
    assert moved(before, after, "gateway_runs_finished_total", status="failed") == 1
    assert moved(before, after, "gateway_events_appended_total") >= len(events)
    assert moved(before, after, "gateway_idempotent_replays_total") == 1
    assert moved(before, after, "gateway_upstream_requests_total", upstream="sim") >= 4
    assert moved(before, after, "gateway_upstream_errors_total", upstream="sim", status="500") == 1
    assert moved(before, after, "gateway_upstream_ttft_seconds_count", upstream="sim") >= 3
    assert moved(before, after, "gateway_ttft_seconds_count") >= 2  # the two streamed creates
    assert moved(before, after, "gateway_inter_event_seconds_count") >= 1  # per write: a loaded machine merges them
    for operation in ("create_response", "append_events", "get_response", "claim_idempotency_key"):
        assert moved(before, after, "gateway_store_operation_seconds_count", operation=operation) >= 1, operation
    assert value(after, "gateway_runs_in_progress") >= 0
    assert value(after, "process_cpu_seconds_total") > 0

    # Bounded labels: no response id, no raw path, anywhere.
    labels = {label for name, pairs in after for _, label in pairs}
    assert not [label for label in labels if re.search(r"resp_|/v1/responses/[^{]", label)], labels
    assert response_id not in str(after)


async def test_gauges_and_counts_belong_to_their_own_app(simulator_url: str) -> None:
    """Two apps in one process, closed and made again: no duplicate registration, and each reports only its
    own runs and requests."""
    settings = gateway_settings(storage_url="memory://", simulator_url=simulator_url)
    for _ in range(2):
        async with serve_gateway(settings) as a, serve_gateway(settings) as b:
            running = await a.client.responses.create(
                model="sim-1", input="slow", background=True, metadata={"sim_tokens": "400", "sim_token_delay_ms": "5"}
            )

            async def a_runs_it() -> bool:
                return value(await scrape(a.http), "gateway_runs_in_progress") == 1

            await eventually(a_runs_it)
            on_b = await scrape(b.http)
            assert value(on_b, "gateway_runs_in_progress") == 0
            assert value(on_b, "gateway_http_requests_total", route="/v1/responses", method="POST", status="200") == 0
            await a.client.responses.cancel(running.id)


def _settings(simulator_url: str, **metrics: object) -> Settings:
    return gateway_settings(storage_url="memory://", simulator_url=simulator_url, metrics=metrics)


async def test_a_separate_port_serves_metrics_and_the_main_port_does_not(simulator_url: str) -> None:
    async with serve_gateway(_settings(simulator_url, port=0)) as gateway:
        assert gateway.app is not None
        port = gateway.app[METRICS].port
        assert port is not None
        await gateway.client.models.list()
        async with gateway.http.get("/metrics") as reply:
            assert reply.status == 404
        async with aiohttp.ClientSession() as http:
            samples = await scrape(http, f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "gateway_http_requests_total", route="/v1/models", method="GET", status="200") == 1
        assert value(samples, "gateway_http_requests_total", route="unmatched", method="GET", status="404") == 1


async def test_metrics_need_no_api_key_on_the_main_port_unless_configured(
    simulator_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_TEST_KEY", "sk-metrics")
    auth = {"enabled": True, "keys": [{"tenant": "t", "key_env": "METRICS_TEST_KEY"}]}
    open_settings = gateway_settings(storage_url="memory://", simulator_url=simulator_url, auth=auth)
    async with serve_gateway(open_settings) as gateway:
        async with gateway.http.get("/v1/models") as reply:
            assert reply.status == 401
        samples = await scrape(gateway.http)  # no Authorization header either
        assert value(samples, "gateway_http_requests_total", route="/v1/models", method="GET", status="401") == 1
    closed = gateway_settings(
        storage_url="memory://", simulator_url=simulator_url, auth=auth, metrics={"require_auth": True}
    )
    async with serve_gateway(closed) as gateway:
        async with gateway.http.get("/metrics") as reply:
            assert reply.status == 401
        await scrape_with_key(gateway, "sk-metrics")


async def scrape_with_key(gateway: Gateway, key: str) -> None:
    async with gateway.http.get("/metrics", headers={"Authorization": f"Bearer {key}"}) as reply:
        assert reply.status == 200
        assert "gateway_http_requests_total" in await reply.text()


async def test_a_takeover_is_counted_with_its_latency(redis_server: str, simulator_url: str, key_prefix: str) -> None:
    """A stops dead right after storing a response; B takes it over once the lease expires and counts it, with
    the time from the lease's expiry."""
    faults = frozen_at("admit.created")
    async with instance(redis_server, simulator_url, key_prefix, faults=faults) as a:
        creating = asyncio.ensure_future(a.client.responses.create(model="sim-1", input="orphan", background=True))
        response_id = await asyncio.wait_for(faults.freezer.reached, 10)
        async with instance(redis_server, simulator_url, key_prefix) as b:

            async def taken_over() -> Samples | None:
                samples = await scrape(b.http)
                return samples if value(samples, "gateway_takeovers_total", reason="lease_expired") == 1 else None

            samples = await eventually(taken_over, within=10)
            assert value(samples, "gateway_takeover_seconds_count") == 1
            assert value(samples, "gateway_takeover_seconds_sum") < 10
            assert (await b.client.responses.retrieve(response_id)).status in ("in_progress", "completed")
        creating.cancel()
        with pytest.raises((asyncio.CancelledError, openai.APIError)):
            await creating


def test_a_webhook_delivery_is_recorded() -> None:
    """The function the webhook sender calls: a result counted, a delivered one's latency observed."""
    metrics = GatewayMetrics(MetricsConfig())
    metrics.runs.webhook_delivery("retried")
    metrics.runs.webhook_delivery("delivered", 0.2)
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "gateway_webhook_deliveries_total", result="retried") == 1
    assert value(samples, "gateway_webhook_deliveries_total", result="delivered") == 1
    assert value(samples, "gateway_webhook_deliveries_total", result="given_up") == 0
    assert value(samples, "gateway_webhook_delivery_seconds_count") == 1


def test_loop_metrics_expose_what_prometheus_clients_own_would() -> None:
    """The hot path's lock-free histogram and counter (storage/metrics.py) read exactly like prometheus-client's
    Histogram and Counter fed the same values: buckets on their bounds, below the first, past the last, labelled or
    not (its `_created` series aside, which they do not keep)."""
    bounds = steps_1_2_5(0.001, 10.0)
    theirs, ours = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    their_histogram = Histogram("h_seconds", "doc", ["op"], buckets=bounds, registry=theirs)
    our_histogram = LoopHistogram("h_seconds", "doc", ["op"], buckets=bounds, registry=ours)
    their_plain = Histogram("p_seconds", "doc", buckets=bounds, registry=theirs)
    our_plain = LoopHistogram("p_seconds", "doc", buckets=bounds, registry=ours)
    their_counter = Counter("c_total", "doc", registry=theirs)
    our_counter = LoopCounter("c_total", "doc", registry=ours)
    for amount in (0.0, 0.0005, 0.001, 0.0011, 0.25, 7.5, 10.0, 11.0, 1e9):
        for op in ("append", "read"):
            their_histogram.labels(op).observe(amount)
            our_histogram.labels(op).observe(amount)
        their_plain.observe(amount)
        our_plain.observe(amount)
    their_counter.inc(3)
    our_counter.inc(3)

    def without_created(registry: CollectorRegistry) -> Samples:
        return {
            key: sample for key, sample in parse(generate_latest(registry).decode()).items() if "_created" not in key[0]
        }

    assert without_created(ours) == without_created(theirs)
    assert value(without_created(ours), "h_seconds_bucket", op="append", le="0.001") == 3
