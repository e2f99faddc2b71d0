"""Response snapshots: the initial Response object of a request, and how each event changes a snapshot."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from runs.request import CreateResponseRequest
from runs.status import ResponseStatus
from storage.base import StoredEvent
from storage.fold import LIFECYCLE_EVENT_TYPES, Json, apply_event

__all__ = ["LIFECYCLE_EVENT_TYPES", "Json", "apply_event", "has_output", "initial_snapshot", "stored_json"]


# `value` as the JSON bytes that are stored and sent: orjson's own function, not a wrapper (a call of its own for
# every event). Not trimmed to size here: a store that keeps bytes in this process (the embedded one) keeps a copy
# of exactly their size; Redis keeps none.
stored_json: Callable[[Any], bytes] = orjson.dumps


def initial_snapshot(
    request: CreateResponseRequest, *, response_id: str, created_at: int, status: ResponseStatus
) -> Json:
    """The Response object for a just-admitted request: every field of the SDK's `Response` model (and the three
    OpenAI returns beyond it: `store`, `presence_penalty`, `frequency_penalty`), echoing what the request set and
    OpenAI's defaults otherwise, null when unknown. Strict clients require every one of them."""
    extra = request.model_extra or {}
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
        "prompt": request.prompt,
        "prompt_cache_key": request.prompt_cache_key,
        "prompt_cache_retention": _one_of(extra.get("prompt_cache_retention"), _CACHE_RETENTIONS),
        "reasoning": request.reasoning or {"effort": None, "summary": None},
        "safety_identifier": request.safety_identifier,
        "service_tier": request.service_tier or "auto",
        "store": request.is_stored,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "presence_penalty": _number(extra.get("presence_penalty"), 0.0),
        "frequency_penalty": _number(extra.get("frequency_penalty"), 0.0),
        "text": _text_config(request.text),
        "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
        "tools": [echoed_tool(tool) for tool in request.tools or []],
        "top_logprobs": 0 if request.top_logprobs is None else request.top_logprobs,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": request.truncation or "disabled",
        "usage": None,
        "user": request.user,
        # Features the gateway does not provide (or only an upstream reports): present, and null.
        "access_programs": None,
        "image": None,
        "input_transformations": None,
        "moderation": None,
        "prompt_cache_diagnostics": None,
        "prompt_cache_options": None,
        "tool_usage": None,
    }


# What an upstream's final Response may tell about how it ran the request; the gateway keeps it over its own
# echo of the request. Identity and state (id, status, store, previous_response_id, conversation, …) stay ours.
UPSTREAM_REPORTED_FIELDS = (
    "service_tier",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "reasoning",
    "truncation",
    "prompt_cache_retention",
    "prompt_cache_options",
    "prompt_cache_diagnostics",
    "moderation",
    "tool_usage",
)
_NUMERIC_FIELDS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty", "top_logprobs"})
_CACHE_RETENTIONS = frozenset({"in_memory", "24h"})


def upstream_reported(upstream_response: Json) -> Json:
    """The fields of `UPSTREAM_REPORTED_FIELDS` an upstream's final Response set, where they have a usable value."""
    reported: Json = {}
    for name in UPSTREAM_REPORTED_FIELDS:
        value = upstream_response.get(name)
        if value is None:
            continue
        if name in _NUMERIC_FIELDS and _number(value, None) is None:
            continue  # a provider's odd value must not make the response invalid for strict clients
        if name == "top_logprobs" and not isinstance(value, int):
            continue
        reported[name] = value
    return reported


MAX_METADATA_PAIRS = 16


def with_notes(metadata: Json, notes: Any) -> Json:
    """`metadata` plus what an upstream adapter noted in its final Response's metadata (how usage was counted,
    what was dropped): only keys the response does not have, only strings, within OpenAI's metadata limits."""
    if not isinstance(notes, dict):
        return metadata
    merged = dict(metadata)
    for key, value in notes.items():
        if len(merged) >= MAX_METADATA_PAIRS:
            break
        if isinstance(key, str) and isinstance(value, str) and key not in merged and len(key) <= 64:
            merged[key] = value[:512]
    return merged


def echoed_tool(tool: Json) -> Json:
    """A request's tool as the Response echoes it: function tools carry `strict` (true unless the request said
    otherwise, as OpenAI defaults it) and `parameters`, as OpenAI's schema requires."""
    if tool.get("type") != "function":
        return tool
    return {**tool, "parameters": tool.get("parameters"), "strict": tool.get("strict", True)}


def _text_config(text: Json | None) -> Json:
    config = dict(text) if text else {}
    config.setdefault("format", {"type": "text"})
    config.setdefault("verbosity", "medium")
    return config


def _number(value: Any, default: float | None) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return default


def _one_of(value: Any, allowed: frozenset[str]) -> str | None:
    return value if isinstance(value, str) and value in allowed else None


def has_output(events: Iterable[StoredEvent]) -> bool:
    """Whether `events` hold an output event, anything but the lifecycle's: the first one is what a client waits
    for."""
    return any(event.type not in LIFECYCLE_EVENT_TYPES for event in events)
