"""Compaction: a context replaced by the user's own messages and one `compaction` item (`/responses/compact`,
`context_management`)."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, StringConstraints

from runs.errors import InvalidRequest
from runs.history import previous_response_history
from runs.ids import new_id
from runs.items import (
    Json,
    as_model_input,
    check_input_items,
    check_tool_outputs,
    normalise_items,
    stored_in_conversation,
)
from runs.request import CreateResponseRequest
from runs.token_estimate import estimate_tokens
from runs.upstream.base import Upstream, UpstreamFailure
from runs.upstream.retry import stream_with_retries
from runs.upstream.router import UpstreamRouter
from runs.usage import complete_usage
from storage.base import Store

CONTENT_PREFIX = "rgw-compaction-v1."
COMPACTED_OBJECT = "response.compaction"
SUMMARY_INSTRUCTIONS = (
    "You are compacting a conversation so that it can continue in a smaller context. Write a concise summary of "
    "everything above that the conversation needs in order to go on: the user's goals and constraints, decisions "
    "made, facts established, tool calls made and what they returned, and work still open. Write only the summary."
)
SUMMARY_REQUEST = "Summarise the conversation so far, as instructed."
_SUMMARY_PREAMBLE = "Summary of the earlier part of this conversation (compacted):\n\n"


def is_gateway_compaction(item: Any) -> bool:
    """Whether `item` is a compaction item the gateway made (and so can expand)."""
    return (
        isinstance(item, dict)
        and item.get("type") == "compaction"
        and isinstance(item.get("encrypted_content"), str)
        and item["encrypted_content"].startswith(CONTENT_PREFIX)
    )


def compaction_item(summary: str) -> Json:
    """A new compaction item carrying `summary` (for providers that do not compact themselves).

    Its `encrypted_content` is `CONTENT_PREFIX` + base64url of JSON: opaque by contract, as OpenAI's is, but not
    encrypted, since it holds nothing the client could not read already (a summary of its own conversation), and
    a client that rewrote it would only change its own context, as editing its input would. Self-contained, it
    never expires and any instance expands it (`expand_compactions`)."""
    content = base64.urlsafe_b64encode(orjson.dumps({"summary": summary})).decode()
    return {"id": new_id("cmp"), "type": "compaction", "encrypted_content": CONTENT_PREFIX + content}


def summary_of(item: Json, param: str = "input") -> str:
    """The summary a gateway compaction item carries; a 400 naming `param` when it was damaged."""
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(item["encrypted_content"][len(CONTENT_PREFIX) :]))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        decoded = None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("summary"), str):
        raise InvalidRequest(
            "The compaction item's encrypted_content is not valid.", param=f"{param}.encrypted_content"
        )
    return str(decoded["summary"])


def check_compactions(items: list[Any]) -> None:
    """A 400 naming the first gateway compaction item in a request's input that cannot be expanded."""
    for index, item in enumerate(items):
        if is_gateway_compaction(item):
            summary_of(item, param=f"input[{index}]")


def has_compaction(items: list[Any]) -> bool:
    return any(isinstance(item, dict) and item.get("type") == "compaction" for item in items)


def expand_compactions(items: list[Json]) -> list[Json]:
    """Model input from items that hold compaction items. Before the last one, only the user's own messages and
    what followed the last of them (a tool call and its output still being answered) are kept: the rest is what
    it stands for. The gateway's own item goes to the model as its summary, first (a developer message: chat
    templates take a system message only at the start); a provider's item stays where it is, for the provider."""
    last = max((index for index, item in enumerate(items) if item.get("type") == "compaction"), default=None)
    if last is None:
        return items
    last_user = max((index for index in range(last) if _is_user_message(items[index])), default=-1)
    kept = [
        item
        for index, item in enumerate(items)
        if index > last or (index < last and (index > last_user or _is_user_message(item)))
    ]
    compaction = items[last]
    if is_gateway_compaction(compaction):
        return [{"role": "developer", "content": _SUMMARY_PREAMBLE + summary_of(compaction)}, *kept]
    position = sum(1 for index in range(last) if index > last_user or _is_user_message(items[index]))
    return [*kept[:position], compaction, *kept[position:]]


def compacted_window(items: list[Json], compaction: Json) -> list[Json]:
    """What replaces `items`: the user's messages, in order, then `compaction`."""
    return [item for item in items if _is_user_message(item)] + [compaction]


async def summarise(
    upstream: Upstream, model_input: list[Json], *, model: str, api_key: str | None
) -> tuple[str, Json | None]:
    """Ask the model for a summary of `model_input` (items as a provider takes them): the text and the usage."""
    body = upstream.prepare(
        {
            "model": model,
            "instructions": SUMMARY_INSTRUCTIONS,
            "input": [*model_input, {"role": "user", "content": SUMMARY_REQUEST}],
        }
    )
    final: Json | None = None
    deltas: list[str] = []
    async for events in stream_with_retries(upstream, body, api_key):
        for event in events:
            kind = event.get("type")
            if kind == "response.output_text.delta":
                deltas.append(str(event.get("delta", "")))
            elif kind in ("response.completed", "response.incomplete"):
                final = event.get("response") or {}
            elif kind == "response.failed":
                error = (event.get("response") or {}).get("error") or {}
                raise UpstreamFailure(str(error.get("message") or "the summary could not be made"))
    summary = (_output_text(final) if final is not None else "") or "".join(deltas)
    if not summary.strip():
        # An empty summary would stand for the whole context and erase it: better no compaction at all.
        raise UpstreamFailure(f"upstream {upstream.spec.name!r} gave an empty summary; nothing was compacted.")
    return summary, complete_usage((final or {}).get("usage"))


def compacted_response(window: list[Json], usage: Json | None) -> Json:
    """The SDK's CompactedResponse for a compaction the gateway made."""
    return {
        "id": new_id("cmp"),
        "object": COMPACTED_OBJECT,
        "created_at": int(time.time()),
        "output": window,
        "usage": usage or complete_usage({}),
    }


def _after_last_user_message(items: list[Json]) -> list[Json]:
    last_user = max((index for index, item in enumerate(items) if _is_user_message(item)), default=-1)
    return items[last_user + 1 :]


def _is_user_message(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type", "message") == "message" and item.get("role") == "user"


def _output_text(response: Json) -> str:
    return "".join(
        str(part.get("text", ""))
        for item in response.get("output") or []
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or []
        if isinstance(part, dict) and part.get("type") == "output_text"
    )


class CompactRequest(BaseModel):
    """The body of `POST /v1/responses/compact` (the SDK's ResponseCompactParams). Unknown fields are kept and
    passed to a provider that compacts itself."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, StringConstraints(min_length=1)]
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None


async def compact(
    store: Store, router: UpstreamRouter, request: CompactRequest, *, tenant: str, client_key: str | None
) -> Json:
    """Compact the request's context (its previous responses' items, then its input): by the provider when it
    compacts, else by a summary from the routed model. Refusals (400/404) come before the provider is asked."""
    history: list[Json] = []
    if request.previous_response_id is not None:
        history = await previous_response_history(store, request.previous_response_id, tenant=tenant)
    if isinstance(request.input, list):
        check_input_items(request.input)
    own = normalise_items(request.input)
    check_tool_outputs(own, history)
    items = history + own
    if not items:
        raise InvalidRequest(
            "Nothing to compact: give input, or a previous_response_id whose context is to be compacted.",
            param="input",
            code="missing_required_parameter",
        )
    check_compactions(own)
    upstream = router.route(request.model)
    api_key = upstream.spec.call_key(client_key)
    model_input = expand_compactions(as_model_input(items))
    passed = request.model_dump(exclude_none=True, exclude={"previous_response_id"})
    provider_compacted = await upstream.compact({**passed, "input": model_input}, api_key=api_key)
    if provider_compacted is not None:
        return provider_compacted
    summary, usage = await summarise(upstream, model_input, model=request.model, api_key=api_key)
    return compacted_response(compacted_window(stored_in_conversation(items), compaction_item(summary)), usage)


# -- compaction before a turn (`context_management` on create) ----------------------------------------------

# The threshold when `compact_threshold` is null (OpenAI's is the model's own; the gateway knows no context sizes).
DEFAULT_COMPACT_THRESHOLD = 100_000


@dataclass(frozen=True, slots=True)
class CompactionDue:
    """A create whose context reached its `context_management` threshold: its turn compacts first. `body` is the
    provider body in the Responses form (history and input) that is compacted."""

    body: Json


def compaction_due(request: CreateResponseRequest, body: Json) -> CompactionDue | None:
    """The compaction a create's turn starts with: when the request asks for it (`context_management`) and its
    input reaches the threshold, measured with the gateway's estimate (`runs.token_estimate`)."""
    entries = request.context_management
    if not entries:
        return None
    threshold = min(entry.compact_threshold or DEFAULT_COMPACT_THRESHOLD for entry in entries)
    if estimate_tokens(body) < threshold:
        return None
    return CompactionDue(body)


@dataclass(frozen=True, slots=True)
class CompactedTurn:
    """What compaction made of a turn's context: the item that goes into the output, the model input that
    replaces the context, and what the compaction itself cost."""

    item: Json
    model_input: list[Json]
    usage: Json | None


async def compact_turn(upstream: Upstream, body: Json, *, api_key: str | None) -> CompactedTurn:
    """Compact a turn's context (`body`, a Responses provider body): by the provider when it compacts, else by a
    summary from the model."""
    raw_input = body.get("input")
    model_input: list[Json] = (
        [{"role": "user", "content": raw_input}] if isinstance(raw_input, str) else list(raw_input or [])
    )
    passed: Json = {
        key: body[key] for key in ("model", "instructions", "prompt_cache_key", "service_tier") if key in body
    }
    provider_compacted = await upstream.compact({**passed, "input": model_input}, api_key=api_key)
    if provider_compacted is not None:
        window = [item for item in provider_compacted.get("output") or [] if isinstance(item, dict)]
        items = [item for item in window if item.get("type") == "compaction"]
        if not items:
            raise UpstreamFailure(f"upstream {upstream.spec.name!r} compacted without a compaction item.")
        # The provider's window, then what the turn is still answering (as expand_compactions keeps it).
        window_input = as_model_input(window) + _after_last_user_message(model_input)
        return CompactedTurn(items[-1], window_input, complete_usage(provider_compacted.get("usage")))
    summary, usage = await summarise(upstream, model_input, model=str(body["model"]), api_key=api_key)
    item = compaction_item(summary)
    return CompactedTurn(item, expand_compactions([*model_input, item]), usage)
