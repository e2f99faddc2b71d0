"""Tracing: the span tree request → run → provider call, over both upstream kinds, with the trace carried to the
provider in `traceparent`; the GenAI attributes of the call; and no spans at all with tracing off."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config import load_settings
from runs.tracing import RUN_SPAN_NAME
from simulator import SimulatorSettings, create_simulator_app
from tests.conftest import Gateway, eventually, serve_gateway

# A caller's own trace: the gateway's spans must continue it.
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
MODEL = "sim-1"


@dataclass
class RecordingModel:
    """The simulator in this process, noting the headers of every model call it receives."""

    url: str
    port: int
    calls: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def model() -> AsyncIterator[RecordingModel]:
    app = create_simulator_app(SimulatorSettings(tokens=4, token_delay_ms=1, ttft_ms=1))
    server = TestServer(app, host="127.0.0.1")
    recording = RecordingModel(url="", port=0)

    async def note_headers(request: web.Request, _: web.StreamResponse) -> None:
        if request.path in ("/v1/responses", "/v1/chat/completions"):
            recording.calls.append(dict(request.headers))

    app.on_response_prepare.append(note_headers)
    await server.start_server()
    recording.url, recording.port = str(server.make_url("/v1")), server.port or 0
    yield recording
    await server.close()


@contextlib.asynccontextmanager
async def traced_gateway(
    redis_server: str, key_prefix: str, model: RecordingModel, kind: str, *, enabled: bool = True, **extra: Any
) -> AsyncIterator[tuple[Gateway, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = load_settings(
        storage={"url": redis_server, "key_prefix": key_prefix, "retention_seconds": 600},
        upstreams=[{"name": "sim", "kind": kind, "base_url": model.url, "max_retries": 0}],
        tracing={"enabled": enabled},
        **extra,
    )
    try:
        async with serve_gateway(settings, tracer_provider=provider) as gateway:
            yield gateway, exporter
    finally:
        provider.shutdown()


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def attributes_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    named = [span for span in spans if span.name == name]
    assert len(named) == 1, [span.name for span in spans]
    return named[0]


async def spans_named(exporter: InMemorySpanExporter, *names: str) -> tuple[ReadableSpan, ...]:
    """All finished spans, once one of each of `names` has finished (a request's span ends just after its client
    has read the last of it; a run's, after its response is stored)."""

    async def finished() -> tuple[ReadableSpan, ...]:
        spans = exporter.get_finished_spans()
        return spans if set(names) <= {span.name for span in spans} else ()

    spans: tuple[ReadableSpan, ...] = await eventually(finished, within=5)
    return spans


def check_model_call(call: ReadableSpan, run: ReadableSpan, model: RecordingModel, kind: str, usage: Any) -> None:
    """The provider call: a CLIENT child of the run, named and described as the GenAI conventions say, whose
    `traceparent` reached the provider."""
    assert call.name == f"chat {MODEL}"
    assert call.kind is SpanKind.CLIENT
    assert parent_of(call) == run.context.span_id
    assert call.context.trace_id == run.context.trace_id
    attributes = attributes_of(call)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "sim"
    assert attributes["openai.api.type"] == {"responses": "responses", "chat": "chat_completions"}[kind]
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.response.model"] == MODEL
    assert str(attributes["gen_ai.response.id"]).startswith({"responses": "resp_", "chat": "chatcmpl-"}[kind])
    assert attributes["gen_ai.response.finish_reasons"] == ({"responses": "completed", "chat": "stop"}[kind],)
    assert attributes["gen_ai.usage.input_tokens"] == usage.input_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == usage.output_tokens > 0
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == model.port
    assert "error.type" not in attributes
    assert call.status.status_code is StatusCode.UNSET
    sent = [headers.get("traceparent") for headers in model.calls]
    flags = int(call.context.trace_flags)
    assert sent == [f"00-{call.context.trace_id:032x}-{call.context.span_id:016x}-{flags:02x}"]
    assert flags & 1  # sampled


@pytest.mark.parametrize("kind", ["responses", "chat"])
async def test_a_streamed_response_is_a_request_span_a_run_span_and_a_model_call_span(
    redis_server: str, key_prefix: str, model: RecordingModel, kind: str
) -> None:
    async with traced_gateway(redis_server, key_prefix, model, kind) as (gateway, exporter):
        async with gateway.client.responses.stream(
            model=MODEL, input="trace me", extra_headers={"traceparent": CALLER_TRACEPARENT}
        ) as stream:
            async for _ in stream:
                pass
            response = await stream.get_final_response()
        spans = await spans_named(exporter, "POST /v1/responses", RUN_SPAN_NAME, f"chat {MODEL}")
    assert len(spans) == 3, [span.name for span in spans]
    assert response.status == "completed"
    assert response.usage is not None
    request = one(spans, "POST /v1/responses")
    assert request.kind is SpanKind.SERVER
    assert f"{request.context.trace_id:032x}" == CALLER_TRACE_ID
    assert f"{parent_of(request):016x}" == CALLER_SPAN_ID
    assert attributes_of(request)["http.route"] == "/v1/responses"
    assert attributes_of(request)["http.response.status_code"] == 200
    run = one(spans, RUN_SPAN_NAME)
    assert parent_of(run) == request.context.span_id
    run_attributes = attributes_of(run)
    assert run_attributes["gateway.response.id"] == response.id
    assert run_attributes["gateway.response.status"] == "completed"
    assert run_attributes["gateway.run.resumed"] is False
    check_model_call(one(spans, f"chat {MODEL}"), run, model, kind, response.usage)


@pytest.mark.parametrize("kind", ["responses", "chat"])
async def test_a_background_run_outlives_its_request_span_as_its_child(
    redis_server: str, key_prefix: str, model: RecordingModel, kind: str
) -> None:
    async with traced_gateway(redis_server, key_prefix, model, kind) as (gateway, exporter):
        created = await gateway.client.responses.create(model=MODEL, input="in the background", background=True)

        async def ended() -> Any:
            response = await gateway.client.responses.retrieve(created.id)
            return response if response.status == "completed" else None

        response = await eventually(ended, within=5)
        spans = await spans_named(exporter, "POST /v1/responses", RUN_SPAN_NAME, f"chat {MODEL}")
    create = one(spans, "POST /v1/responses")
    assert {span.name for span in spans} == {
        create.name,
        RUN_SPAN_NAME,
        f"chat {MODEL}",
        "GET /v1/responses/{response_id}",
    }
    run = one(spans, RUN_SPAN_NAME)
    assert parent_of(run) == create.context.span_id
    assert attributes_of(run)["gateway.run.background"] is True
    assert (create.end_time or 0) < (run.end_time or 0)
    check_model_call(one(spans, f"chat {MODEL}"), run, model, kind, response.usage)


async def test_a_failed_model_call_names_its_error(redis_server: str, key_prefix: str, model: RecordingModel) -> None:
    """The provider's 503 (no retries configured) fails the call's span with error.type, and the run's."""
    async with traced_gateway(redis_server, key_prefix, model, "responses") as (gateway, exporter):
        created = await gateway.client.responses.create(
            model=MODEL, input="fail me", background=True, metadata={"sim_fault": "http_503"}
        )

        async def ended() -> Any:
            response = await gateway.client.responses.retrieve(created.id)
            return response if response.status == "failed" else None

        response = await eventually(ended, within=5)
        spans = await spans_named(exporter, RUN_SPAN_NAME, f"chat {MODEL}")
    assert response.error is not None
    call, run = one(spans, f"chat {MODEL}"), one(spans, RUN_SPAN_NAME)
    assert parent_of(call) == run.context.span_id
    for span in (call, run):
        assert span.status.status_code is StatusCode.ERROR
        assert attributes_of(span)["error.type"] == response.error.code
    assert attributes_of(run)["gateway.response.status"] == "failed"
    assert "gen_ai.usage.output_tokens" not in attributes_of(call)


async def test_a_queued_run_started_later_is_a_root_span_of_its_own(
    redis_server: str, key_prefix: str, model: RecordingModel
) -> None:
    """A run started by the sweeper (queued here; the same path takes over a dead instance's runs) is not in its
    admitting request's trace: a new root span, naming its response."""
    runs = {"max_concurrent": 1, "sweep_seconds": 0.1}
    async with traced_gateway(redis_server, key_prefix, model, "responses", runs=runs) as (gateway, exporter):
        first = await gateway.client.responses.create(
            model=MODEL, input="first", background=True, metadata={"sim_tokens": "20", "sim_token_delay_ms": "10"}
        )
        queued = await gateway.client.responses.create(model=MODEL, input="second", background=True)
        assert queued.status == "queued"

        async def ended() -> Any:
            response = await gateway.client.responses.retrieve(queued.id)
            return response if response.status == "completed" else None

        await eventually(ended, within=5)

        async def two_runs() -> list[ReadableSpan]:
            spans = [span for span in exporter.get_finished_spans() if span.name == RUN_SPAN_NAME]
            return spans if len(spans) == 2 else []

        run_spans = await eventually(two_runs, within=5)
        calls = [span for span in exporter.get_finished_spans() if span.name == f"chat {MODEL}"]
    by_response = {span.attributes["gateway.response.id"]: span for span in run_spans if span.attributes}
    admitted, resumed = by_response[first.id], by_response[queued.id]
    assert parent_of(admitted) is not None
    assert attributes_of(admitted)["gateway.run.resumed"] is False
    assert parent_of(resumed) is None
    assert attributes_of(resumed)["gateway.run.resumed"] is True
    assert resumed.context.trace_id != admitted.context.trace_id
    assert sorted(call.parent.span_id for call in calls if call.parent) == sorted(
        span.context.span_id for span in run_spans
    )


async def test_with_tracing_off_there_are_no_spans_and_no_traceparent(
    redis_server: str, key_prefix: str, model: RecordingModel
) -> None:
    """The provider given is not used when the settings leave tracing off; nothing is sent to the model either."""
    async with traced_gateway(redis_server, key_prefix, model, "responses", enabled=False) as (gateway, exporter):
        async with gateway.client.responses.stream(
            model=MODEL, input="untraced", extra_headers={"traceparent": CALLER_TRACEPARENT}
        ) as stream:
            async for _ in stream:
                pass
        created = await gateway.client.responses.create(model=MODEL, input="untraced too", background=True)
        await eventually(lambda: _completed(gateway, created.id), within=5)
    assert exporter.get_finished_spans() == ()
    assert len(model.calls) == 2
    assert all("traceparent" not in headers for headers in model.calls)


async def _completed(gateway: Gateway, response_id: str) -> bool:
    return (await gateway.client.responses.retrieve(response_id)).status == "completed"


async def test_spans_are_exported_over_otlp_when_the_app_closes(
    redis_server: str, key_prefix: str, model: RecordingModel
) -> None:
    """With no provider given, the app builds one from its settings (OTLP/HTTP, batched), and its last spans
    reach the collector when the app shuts it down."""
    bodies: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(content_type="application/x-protobuf", body=b"")

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    server = TestServer(collector, host="127.0.0.1")
    await server.start_server()
    settings = load_settings(
        storage={"url": redis_server, "key_prefix": key_prefix},
        upstreams=[{"name": "sim", "base_url": model.url, "max_retries": 0}],
        tracing={"enabled": True, "otlp_endpoint": str(server.make_url("/v1/traces")), "service_name": "gw-test"},
    )
    try:
        async with serve_gateway(settings) as gateway:
            response = await gateway.client.responses.create(model=MODEL, input="export me")
            assert response.status == "completed"
            assert bodies == []  # batched: nothing is sent per span
    finally:
        await server.close()
    exported = b"".join(bodies)
    for expected in (b"gw-test", b"POST /v1/responses", RUN_SPAN_NAME.encode(), f"chat {MODEL}".encode()):
        assert expected in exported
