"""Tracing of runs (OpenTelemetry): a span per run on this instance, and its provider call as a child span.

The provider call's span follows the OpenTelemetry GenAI semantic conventions as kept in
open-telemetry/semantic-conventions-genai (their names since semantic-conventions 1.37: `gen_ai.provider.name`,
which replaced `gen_ai.system`). Both upstream kinds are `gen_ai.operation.name` "chat": the Responses API is
OpenAI's other API for the same inference call, and the OpenAI conventions tell the two apart with
`openai.api.type` ("responses" / "chat_completions"), not with the operation's name.

When tracing is off nothing here exists: the run manager has no RunTracer and no run has a RunTrace. When it is
on, spans are made per run and per provider call, never per event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import yarl
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from runs.metrics import RunMetrics
from runs.upstream.base import ProviderAnswer, Upstream, UpstreamFailure, UpstreamSpec
from runs.upstream.retry import stream_with_retries

Batch = list[dict[str, Any]]

RUN_SPAN_NAME = "run response"
# The gateway's own attributes.
RESPONSE_ID = "gateway.response.id"
RESPONSE_STATUS = "gateway.response.status"
RUN_RESUMED = "gateway.run.resumed"
RUN_BACKGROUND = "gateway.run.background"
CALL_CLOSED_EARLY = "gateway.call.closed_early"  # the run stopped reading before the provider's answer was whole
CALL_RETRY_EVENT = "gateway.call.retry"
ERROR_TYPE = "error.type"
# The GenAI conventions' (and the OpenAI ones': openai.api.type).
OPERATION = "chat"
_API_TYPES = {"responses": "responses", "chat": "chat_completions"}
# Where each kind's prepared body names the request's sampling settings.
_MAX_TOKENS_FIELDS = ("max_output_tokens", "max_completion_tokens", "max_tokens")

_PROPAGATOR = TraceContextTextMapPropagator()


class RunTracer:
    """Makes the traces of this instance's runs, from the tracer of the app's own provider."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._upstream_attributes: dict[str, dict[str, AttributeValue]] = {}

    def admitted_run(self) -> RunTrace:
        """The trace of a run admitted by the HTTP request being served: its span is a child of that request's
        span (the current one), even when the run outlives the request (background runs)."""
        return RunTrace(self, otel_context.get_current(), resumed=False)

    def resumed_run(self) -> RunTrace:
        """The trace of a run this instance claimed (a queued response starting, or an orphan taken over from an
        instance that died): a new root span, since the admitting request's trace context was never stored and
        may belong to another process. The trace is found from the admitting one by `gateway.response.id`."""
        return RunTrace(self, otel_context.Context(), resumed=True)

    def start_span(
        self, name: str, parent: otel_context.Context, kind: SpanKind, attributes: Mapping[str, AttributeValue]
    ) -> Span:
        return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)

    def upstream_attributes(self, spec: UpstreamSpec) -> dict[str, AttributeValue]:
        """What every call to the upstream carries, worked out once per upstream."""
        attributes = self._upstream_attributes.get(spec.name)
        if attributes is None:
            url = yarl.URL(spec.base_url)
            attributes = {
                "gen_ai.operation.name": OPERATION,
                # The configured upstream's name: an OpenAI-compatible base_url does not say whose model it is,
                # so name upstreams after their provider (openai, vllm, …) to get the conventions' values.
                "gen_ai.provider.name": spec.name,
                "openai.api.type": _API_TYPES.get(spec.kind, spec.kind),
                "gen_ai.request.stream": True,
            }
            if url.host:
                attributes["server.address"] = url.host
            if url.port is not None:
                attributes["server.port"] = url.port
            self._upstream_attributes[spec.name] = attributes
        return attributes


class RunTrace:
    """The spans of one run on this instance. The run's span starts when the run, or its provider call, begins
    (the call may go out while the response is still being admitted); the call's span is its child."""

    __slots__ = ("_parent", "_resumed", "_span", "_tracer")

    def __init__(self, tracer: RunTracer, parent: otel_context.Context, *, resumed: bool) -> None:
        self._tracer = tracer
        self._parent = parent
        self._resumed = resumed
        self._span: Span | None = None

    def _run_span(self) -> Span:
        if self._span is None:
            attributes = {RUN_RESUMED: self._resumed}
            self._span = self._tracer.start_span(RUN_SPAN_NAME, self._parent, SpanKind.INTERNAL, attributes)
        return self._span

    def started(self, response_id: str, *, model: str, background: bool) -> None:
        """The run of `response_id` has started here."""
        self._run_span().set_attributes(
            {RESPONSE_ID: response_id, "gen_ai.request.model": model, RUN_BACKGROUND: background}
        )

    def model_call(
        self, upstream: Upstream, body: dict[str, Any], api_key: str | None, metrics: RunMetrics | None = None
    ) -> AsyncGenerator[Batch, None]:
        """The provider call (`stream_with_retries`) as a child span of the run's, W3C `traceparent` sent."""
        parent = trace.set_span_in_context(self._run_span())
        return ModelCall(self._tracer, parent, upstream.spec, body).stream(upstream, body, api_key, metrics)

    def ended(self, status: str, *, failure: UpstreamFailure | None = None, abandoned: bool = False) -> None:
        """The run is over here: ended with `status`, or `abandoned` to another instance."""
        span = self._span
        if span is None:
            return
        if abandoned:
            span.set_attribute(RESPONSE_STATUS, "handed_over")
        else:
            span.set_attribute(RESPONSE_STATUS, status)
            if status == "failed":
                span.set_attribute(ERROR_TYPE, _error_type(failure) if failure is not None else "failed")
                span.set_status(StatusCode.ERROR)
        span.end()

    def not_run(self, error: BaseException | None) -> None:
        """Admission ended without starting the run (its provider call, if one went out, was dropped)."""
        span = self._span
        if span is None:
            return
        if error is not None:
            span.set_attribute(ERROR_TYPE, _error_type(error))
            span.set_status(StatusCode.ERROR)
        span.end()


class ModelCall:
    """One logical provider call, retries included, as a CLIENT span named `chat {gen_ai.request.model}`."""

    __slots__ = ("_answered", "_attributes", "_parent", "_span", "_tracer", "headers")

    def __init__(self, tracer: RunTracer, parent: otel_context.Context, spec: UpstreamSpec, body: Mapping[str, Any]):
        self._tracer = tracer
        self._parent = parent
        model = str(body.get("model", ""))
        self._attributes = {**tracer.upstream_attributes(spec), "gen_ai.request.model": model}
        for name, attribute in (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p")):
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._attributes[attribute] = value
        for name in _MAX_TOKENS_FIELDS:
            if isinstance(body.get(name), int):
                self._attributes["gen_ai.request.max_tokens"] = body[name]
                break
        self._span: Span | None = None
        self._answered = False
        self.headers: dict[str, str] = {}

    async def stream(
        self, upstream: Upstream, body: dict[str, Any], api_key: str | None, metrics: RunMetrics | None = None
    ) -> AsyncGenerator[Batch, None]:
        # The span starts at the first step, as the call goes out, and ends with the stream: read to its end,
        # failed, or closed by the run (at the terminal event, or early: a cancel, steering, a dropped admission).
        name = f"{OPERATION} {self._attributes['gen_ai.request.model']}"
        span = self._span = self._tracer.start_span(name, self._parent, SpanKind.CLIENT, self._attributes)
        _PROPAGATOR.inject(self.headers, context=trace.set_span_in_context(span))
        ended_by: BaseException | None = None
        try:
            async with contextlib.aclosing(stream_with_retries(upstream, body, api_key, self, metrics)) as batches:
                async for batch in batches:
                    yield batch
        except BaseException as error:
            ended_by = error
            raise
        finally:
            self._end(span, ended_by)

    def retrying(self, failure: UpstreamFailure) -> None:
        if self._span is not None:
            self._span.add_event(CALL_RETRY_EVENT, {ERROR_TYPE: _error_type(failure)})

    def answered(self, answer: ProviderAnswer) -> None:
        self._answered = True
        span = self._span
        if span is None:
            return
        attributes: dict[str, AttributeValue] = {"gen_ai.response.finish_reasons": list(answer.finish_reasons)}
        if answer.response_id:
            attributes["gen_ai.response.id"] = answer.response_id
        if answer.model:
            attributes["gen_ai.response.model"] = answer.model
        usage = answer.usage
        if usage:
            for key, attribute in (
                ("input_tokens", "gen_ai.usage.input_tokens"),
                ("output_tokens", "gen_ai.usage.output_tokens"),
            ):
                if isinstance(usage.get(key), int):
                    attributes[attribute] = usage[key]
            cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
            if isinstance(cached, int):
                attributes["gen_ai.usage.cache_read.input_tokens"] = cached
            reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
            if isinstance(reasoning, int):
                attributes["gen_ai.usage.reasoning.output_tokens"] = reasoning
        span.set_attributes(attributes)

    def _end(self, span: Span, ended_by: BaseException | None) -> None:
        if ended_by is not None and not self._answered:
            if not isinstance(ended_by, Exception):  # GeneratorExit, CancelledError
                # Closed by the run before the answer was whole (cancelled, steered, handed over, or its
                # admission failed): not the provider's failure.
                span.set_attribute(CALL_CLOSED_EARLY, True)
            else:
                span.set_attribute(ERROR_TYPE, _error_type(ended_by))
                span.set_status(StatusCode.ERROR, str(ended_by)[:200])
        span.end()


def _error_type(error: BaseException) -> str:
    """A low-cardinality name for what failed: the provider's error code, else its HTTP status, else the
    exception's class (the conventions' `error.type`)."""
    if isinstance(error, UpstreamFailure):
        if error.code:
            return str(error.code)
        if error.status is not None:
            return str(error.status)
    return type(error).__qualname__


def provider_call(
    trace: RunTrace | None,
    upstream: Upstream,
    body: dict[str, Any],
    api_key: str | None,
    metrics: RunMetrics | None = None,
) -> AsyncGenerator[Batch, None]:
    """A run's provider call, with its retries: traced as a child of the run's span when the run is traced, and
    counted in `metrics`."""
    if trace is None:
        return stream_with_retries(upstream, body, api_key, metrics=metrics)
    return trace.model_call(upstream, body, api_key, metrics)
