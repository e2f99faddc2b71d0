"""Adapter for providers that speak the Responses API: stream the turn with `store=false`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from runs.upstream.base import CallTrace, ProviderAnswer, TokenCount, UpstreamFailure, UpstreamSpec
from runs.upstream.client import UpstreamClient

_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# What `POST /responses/input_tokens` takes (the SDK's InputTokenCountParams, less the state the gateway keeps).
_COUNTED_FIELDS = frozenset(
    {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning", "text", "truncation"}
)
# What `POST /responses/compact` takes (the SDK's ResponseCompactParams, less the state the gateway keeps).
_COMPACTED_FIELDS = frozenset({"model", "input", "instructions", "prompt_cache_key", "service_tier"})


class ResponsesUpstream:
    """Calls `POST {base_url}/responses` with `stream=true, store=false` and yields the provider's events: the
    gateway keeps all state itself, so the provider need not."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._client = UpstreamClient(spec)

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """The provider's request body; nothing to refuse, the provider speaks the same API."""
        return {**body, "model": self.spec.upstream_model(body["model"]), "stream": True, "store": False}

    async def stream_turn(
        self, body: dict[str, Any], *, api_key: str | None = None, call: CallTrace | None = None
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        trace_headers = call.headers if call is not None else None
        # aclosing: leaving at the terminal event, or being closed by the run, lets go of the connection now.
        async with contextlib.aclosing(self._client.stream_json("/responses", body, api_key, trace_headers)) as batches:
            async for events in batches:
                for index, event in enumerate(events):
                    if event.get("type") in _TERMINAL_EVENTS:
                        if call is not None:
                            _report_answer(call, event)
                        yield events[: index + 1]
                        return
                yield events
        # A stream that just stops before the terminal event is a broken turn, retried if nothing was emitted.
        raise UpstreamFailure(
            f"upstream {self.spec.name!r} ended the stream before the response finished.", retryable=True
        )

    async def count_input_tokens(self, body: dict[str, Any], *, api_key: str | None = None) -> TokenCount | None:
        counted = {key: value for key, value in body.items() if key in _COUNTED_FIELDS}
        counted["model"] = self.spec.upstream_model(body["model"])
        answer = await self._client.post_json("/responses/input_tokens", counted, api_key)
        if answer is None:
            return None
        tokens = answer.get("input_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise UpstreamFailure(f"upstream {self.spec.name!r} answered input_tokens without a token count.")
        return TokenCount(tokens, "upstream")

    async def compact(self, body: dict[str, Any], *, api_key: str | None = None) -> dict[str, Any] | None:
        compacted = {key: value for key, value in body.items() if key in _COMPACTED_FIELDS}
        compacted["model"] = self.spec.upstream_model(body["model"])
        return await self._client.post_json("/responses/compact", compacted, api_key)

    async def list_models(self) -> list[str]:
        return await self._client.list_models()

    async def close(self) -> None:
        await self._client.close()


def _report_answer(call: CallTrace, terminal: dict[str, Any]) -> None:
    """What the provider's terminal event says of its answer. The Responses API has no finish reason: the
    incomplete reason stands for one (`max_output_tokens`, `content_filter`), else the final status."""
    response = terminal.get("response")
    response = response if isinstance(response, dict) else {}
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    status = response.get("status") or terminal["type"].removeprefix("response.")
    usage = response.get("usage")
    usage = usage if isinstance(usage, dict) else None
    call.answered(ProviderAnswer(response.get("id"), response.get("model"), [str(reason or status)], usage))
