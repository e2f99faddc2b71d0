"""Admission: turn a validated create request into a stored response whose first events are already written."""

from __future__ import annotations

import copy
import time
from typing import Any

import orjson

from runs.errors import InvalidRequest
from runs.ids import new_item_id, new_response_id
from runs.request import CreateResponseRequest, check_request_rules
from runs.snapshot import Json, initial_snapshot
from runs.status import ResponseStatus
from storage.base import NewResponse, StoredEvent

# Fields the gateway answers itself; the rest of the request goes to the provider as given.
_GATEWAY_FIELDS = frozenset({"background", "store", "stream", "previous_response_id", "conversation"})


def check_admissible(request: CreateResponseRequest) -> None:
    """Every rule a request must pass before anything is stored."""
    check_request_rules(request)
    if request.previous_response_id is not None:
        raise InvalidRequest("previous_response_id is not supported by this gateway yet.", param="previous_response_id")
    if request.conversation is not None:
        raise InvalidRequest("conversation is not supported by this gateway yet.", param="conversation")


def upstream_body(request: CreateResponseRequest) -> dict[str, Any]:
    """The body for the provider: the request minus what the gateway itself implements."""
    return request.model_dump(exclude_none=True, exclude=set(_GATEWAY_FIELDS))


def input_items(request: CreateResponseRequest) -> list[Json]:
    """The request's input as items with stable ids, the way `input_items` lists them."""
    if request.input is None:
        return []
    if isinstance(request.input, str):
        raw: list[Json] = [{"type": "message", "role": "user", "content": request.input}]
    else:
        raw = copy.deepcopy(request.input)
    items = []
    for item in raw:
        item.setdefault("type", "message")
        if item["type"] == "message" and isinstance(item.get("content"), str):
            part_type = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part_type, "text": item["content"]}]
        if "id" not in item:
            item["id"] = new_item_id("msg" if item["type"] == "message" else "item")
        items.append(item)
    return items


def first_events(snapshot: Json) -> list[Json]:
    """`response.created`, and for a run that starts at once `response.in_progress`, both with this snapshot."""
    types = ["response.created"]
    if snapshot["status"] == ResponseStatus.IN_PROGRESS:
        types.append("response.in_progress")
    return [
        {"type": kind, "response": copy.deepcopy(snapshot), "sequence_number": number}
        for number, kind in enumerate(types)
    ]


def new_response(request: CreateResponseRequest) -> tuple[NewResponse, Json]:
    """The record admission creates, and the snapshot the run starts from."""
    status = ResponseStatus.QUEUED if request.is_background else ResponseStatus.IN_PROGRESS
    snapshot = initial_snapshot(request, response_id=new_response_id(), created_at=int(time.time()), status=status)
    events = [StoredEvent(e["sequence_number"], e["type"], orjson.dumps(e)) for e in first_events(snapshot)]
    record = NewResponse(
        response_id=snapshot["id"],
        snapshot=orjson.dumps(snapshot),
        status=status.value,
        background=request.is_background,
        stored=request.is_stored,
        input_items=orjson.dumps(input_items(request)),
        events=events,
    )
    return record, snapshot
