"""Strict copies of the openai SDK's response models, for checking what the gateway sends.

The SDK parses leniently: it constructs its models without validating them, so a missing required field, a wrong
type or an unknown field all pass. Strict validators in other clients do not. These copies are built from the SDK's
own models (the protocol's ground truth), field by field, with unknown fields forbidden, no type coercion, and
required fields required. A `Response` must carry every field the SDK declares (null when unknown), as OpenAI's
and the Open Responses schema do, and a function tool must echo `strict` and `parameters`.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pydantic
from openai.types.conversations import Conversation, ConversationDeletedResource, ConversationItem, ConversationItemList
from openai.types.responses import (
    CompactedResponse,
    FunctionTool,
    InputTokenCountResponse,
    Response,
    ResponseInputMessageItem,
    ResponseItemList,
    ResponseStreamEvent,
)
from openai.types.responses.responses_server_event import ResponsesServerEvent

# Fields OpenAI's Response object carries that the SDK's model does not declare (the Open Responses schema
# requires them; OpenAI's API returns them). They are the only unknown fields allowed.
RESPONSE_FIELDS_BEYOND_THE_SDK: Mapping[str, Any] = {
    "store": bool,
    "presence_penalty": float,
    "frequency_penalty": float,
}

# Models whose every declared field must be present, and the fields to require on other models.
_ALL_FIELDS_PRESENT: frozenset[type[pydantic.BaseModel]] = frozenset({Response})
_ALSO_PRESENT: Mapping[type[pydantic.BaseModel], frozenset[str]] = {FunctionTool: frozenset({"parameters", "strict"})}


def _union_members(union: Any) -> tuple[type[pydantic.BaseModel], ...]:
    """The members of one of the SDK's event unions (`Annotated[Union[...], PropertyInfo]`)."""
    return get_args(get_args(union)[0])


# Sampling settings OpenAI always reports as numbers, though the SDK's model lets them be null. And a WebSocket
# event's `stream_id` (the lane it belongs to) is left out when there is no lane: when present it is a string.
_NEVER_NULL: Mapping[type[pydantic.BaseModel], frozenset[str]] = {
    Response: frozenset({"temperature", "top_p", "top_logprobs"}),
    **{member: frozenset({"stream_id"}) for member in _union_members(ResponsesServerEvent)},
}

# A list that is empty has no first or last id: the gateway sends null there, as OpenAI's list endpoints do,
# though the SDK's generated models declare plain strings (its pagination stops on `has_more` alone).
_NULL_WHEN_EMPTY: Mapping[type[pydantic.BaseModel], frozenset[str]] = {
    ConversationItemList: frozenset({"first_id", "last_id"}),
    ResponseItemList: frozenset({"first_id", "last_id"}),
}

_STRICT = pydantic.ConfigDict(extra="forbid", strict=True, populate_by_name=False)
_built: dict[type[pydantic.BaseModel], type[pydantic.BaseModel]] = {}


def _strict_type(annotation: Any) -> Any:
    """`annotation` with every SDK model in it replaced by its strict copy."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return strict_model(annotation)
    origin = get_origin(annotation)
    if origin is None:
        return annotation
    args = get_args(annotation)
    if origin is Annotated:
        # The SDK's discriminator hints (PropertyInfo) mean nothing to pydantic: a union whose members each have
        # their own `type` becomes pydantic's tagged union (one member checked, readable errors); others are
        # checked member by member, which is what a strict client does too.
        inner = _strict_type(args[0])
        return _tagged(inner) or inner
    if origin is Literal:
        return annotation
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict_type(arg) for arg in args)]  # noqa: UP007 - built from a runtime tuple
    if origin in (list, typing.List):  # noqa: UP006
        return types.GenericAlias(list, (_strict_type(args[0]),))  # list[...] of a type known only at run time
    if origin in (dict, typing.Dict):  # noqa: UP006
        return types.GenericAlias(dict, (args[0], _strict_type(args[1])))
    return annotation


def _tagged(union: Any) -> Any:
    members = get_args(union) if get_origin(union) in (Union, types.UnionType) else ()
    tags: list[Any] = []
    for member in members:
        if not (isinstance(member, type) and issubclass(member, pydantic.BaseModel) and "type" in member.model_fields):
            return None
        tags.extend(get_args(member.model_fields["type"].annotation))
    if not tags or len(tags) != len(set(tags)):
        return None
    return Annotated[union, pydantic.Field(discriminator="type")]


def _compacted_output() -> Any:
    """A compacted window holds the user's own messages (input messages, as OpenAI documents it: "all user
    messages, followed by a single compaction item"), which the SDK's output-item union cannot express."""
    output_item = _strict_type(CompactedResponse.model_fields["output"].annotation)
    (item,) = get_args(output_item)
    return types.GenericAlias(list, (Union[(item, strict_model(ResponseInputMessageItem))],))  # noqa: UP007


def strict_model(model: type[pydantic.BaseModel]) -> type[pydantic.BaseModel]:
    """The strict copy of one SDK model (built once)."""
    if model in _built:
        return _built[model]
    must_be_present = _ALSO_PRESENT.get(model, frozenset())
    nullable = _NULL_WHEN_EMPTY.get(model, frozenset())
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        required = info.is_required() or model in _ALL_FIELDS_PRESENT or name in must_be_present
        default: Any = ... if required else info.default
        annotation = _strict_type(info.annotation)
        if name in _NEVER_NULL.get(model, frozenset()):
            (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        fields[name] = (
            annotation | None if name in nullable else annotation,
            pydantic.Field(default, alias=info.alias),
        )
    if model is CompactedResponse:
        fields["output"] = (_compacted_output(), ...)
    if model is Response:
        fields.update({name: (kind, ...) for name, kind in RESPONSE_FIELDS_BEYOND_THE_SDK.items()})
    built: type[pydantic.BaseModel] = pydantic.create_model(  # type: ignore[call-overload, unused-ignore]
        f"Strict{model.__name__}", __config__=_STRICT, **fields
    )
    _built[model] = built
    return built


def _event_models(union: Any) -> dict[str, type[pydantic.BaseModel]]:
    """Each event type's strict model in one of the SDK's event unions, keyed by its `type`."""
    by_type: dict[str, type[pydantic.BaseModel]] = {}
    for member in _union_members(union):
        (event_type,) = get_args(member.model_fields["type"].annotation)
        by_type[event_type] = strict_model(member)
    return by_type


# What an SSE stream carries, and what a WebSocket (`GET /v1/responses` upgraded) does: the same events with an
# optional `stream_id`, an `error` whose `sequence_number` is optional, and the `response.steer.*` notes.
EVENT_MODELS = _event_models(ResponseStreamEvent)
WS_EVENT_MODELS = _event_models(ResponsesServerEvent)

# Bodies by their `object`; lists by the path that returns them.
BODY_MODELS: Mapping[str, type[pydantic.BaseModel]] = {
    "response": strict_model(Response),
    "response.compaction": strict_model(CompactedResponse),
    "response.input_tokens": strict_model(InputTokenCountResponse),
    "conversation": strict_model(Conversation),
    "conversation.deleted": strict_model(ConversationDeletedResource),
}
RESPONSE_ITEM_LIST = strict_model(ResponseItemList)
CONVERSATION_ITEM_LIST = strict_model(ConversationItemList)


def check_event(event: Mapping[str, Any]) -> None:
    """Validate one stream event strictly; raise pydantic.ValidationError or KeyError (unknown type).

    One deliberate exception: the `error` frame the gateway writes when it must end one connection's stream (its
    events were lost in a failover, the stream broke) is not an event of the response's log, so it carries no
    `sequence_number` (gateway/sse.py::error_frame says why any number would mislead a resuming client)."""
    event_type = event.get("type")
    if not isinstance(event_type, str) or event_type not in EVENT_MODELS:
        raise KeyError(f"unknown event type {event_type!r}")
    if event_type == "error" and "sequence_number" not in event:
        event = {**event, "sequence_number": 0}
    EVENT_MODELS[event_type].model_validate(event)


def check_ws_event(event: Mapping[str, Any]) -> None:
    """Validate one WebSocket server event strictly; raise pydantic.ValidationError or KeyError (unknown type).

    One deliberate exception: `response.steer.failed` for `invalid_input` gives the client's input back as it was
    sent (as the SDK documents: "Returns the original, uncommitted input"), and input that failed validation need
    not fit the input schema; it is checked as a string in its place."""
    event_type = event.get("type")
    if not isinstance(event_type, str) or event_type not in WS_EVENT_MODELS:
        raise KeyError(f"unknown event type {event_type!r}")
    error = event.get("error")
    if event_type == "response.steer.failed" and isinstance(error, dict) and error.get("code") == "invalid_input":
        event = {**event, "steer": {**event.get("steer", {}), "input": "(the client's invalid input)"}}
    WS_EVENT_MODELS[event_type].model_validate(event)


@functools.cache
def conversation_item_model() -> pydantic.TypeAdapter[Any]:
    """A single conversation item (what `conversations.items.retrieve` returns)."""
    return pydantic.TypeAdapter(_strict_type(ConversationItem), config=_STRICT)


def body_model(path: str, body: Mapping[str, Any]) -> type[pydantic.BaseModel] | None:
    """The strict model a JSON body from `path` must satisfy, or None when the SDK has none for it (errors,
    `response.deleted`, the models list)."""
    kind = body.get("object")
    if kind == "list":
        if path.endswith("/input_items"):
            return RESPONSE_ITEM_LIST
        if path.startswith("/v1/conversations/") and "/items" in path:
            return CONVERSATION_ITEM_LIST
        return None
    return BODY_MODELS.get(kind) if isinstance(kind, str) else None
