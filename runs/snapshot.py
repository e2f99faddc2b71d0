"""Response snapshots: the initial Response object of a request, and how each event changes a snapshot."""

from __future__ import annotations

from typing import Any

import orjson

from runs.request import CreateResponseRequest
from runs.status import ResponseStatus
from storage.fold import LIFECYCLE_EVENT_TYPES, Json, apply_event

__all__ = ["LIFECYCLE_EVENT_TYPES", "Json", "apply_event", "initial_snapshot", "stored_json"]


def stored_json(value: Any) -> bytes:
    """`value` as the JSON bytes that are stored and sent. Not trimmed to size here: a store that keeps bytes in
    this process (the embedded one) keeps a copy of exactly their size; Redis keeps none."""
    return orjson.dumps(value)


def initial_snapshot(
    request: CreateResponseRequest, *, response_id: str, created_at: int, status: ResponseStatus
) -> Json:
    """The Response object for a just-admitted request: every field the SDK and Open Responses expect, null when
    unknown, echoing what the request set."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status.value,
        "background": request.is_background,
        "completed_at": None,
        "conversation": None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "metadata": request.metadata or {},
        "model": request.model,
        "output": [],
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "prompt_cache_key": request.prompt_cache_key,
        "reasoning": request.reasoning or {"effort": None, "summary": None},
        "safety_identifier": request.safety_identifier,
        "service_tier": request.service_tier or "auto",
        "store": request.is_stored,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": request.text or {"format": {"type": "text"}},
        "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
        "tools": request.tools or [],
        "top_logprobs": request.top_logprobs,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": request.truncation or "disabled",
        "usage": None,
        "user": request.user,
    }
