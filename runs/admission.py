"""Admission: turn a validated create request into a stored response whose first events are already written."""

from __future__ import annotations

import time
from typing import Any

from runs.compaction import check_compactions, expand_compactions, has_compaction
from runs.ids import new_response_id
from runs.items import as_model_input, check_tool_outputs, normalise_items
from runs.request import CreateResponseRequest, check_request_rules
from runs.snapshot import Json, initial_snapshot, stored_json
from runs.status import ResponseStatus
from storage.base import NewResponse, StoredEvent
from storage.keys import idempotency_shard, with_shard

# Fields the gateway answers itself; the rest of the request goes to the provider as given.
_GATEWAY_FIELDS = frozenset(
    {"background", "store", "stream", "previous_response_id", "conversation", "context_management", "stream_id"}
)


def needs_history(request: CreateResponseRequest) -> bool:
    """Whether the request continues items read from the store (a conversation's, or a previous_response_id
    chain's): its provider body, and `check_history`, wait for them."""
    return request.conversation is not None or request.previous_response_id is not None


def check_admissible(request: CreateResponseRequest) -> None:
    """Every rule a request must pass before anything is stored (with a history to read: `check_history` once it
    is read)."""
    check_request_rules(request)
    if not needs_history(request):
        check_history(request, [])


def check_history(request: CreateResponseRequest, history: list[Json]) -> None:
    """The rules that hold between a request's input and the history it continues."""
    if isinstance(request.input, list):
        check_tool_outputs(request.input, history)
        check_compactions(request.input)


def upstream_body(request: CreateResponseRequest, history: list[Json] | None = None) -> dict[str, Any]:
    """The body for the provider: the request minus what the gateway itself implements, with the history the
    gateway owns (a conversation's items, a previous_response_id chain) before the request's own input."""
    body = request.model_dump(exclude_none=True, exclude=set(_GATEWAY_FIELDS))
    if history:
        own = request.input if isinstance(request.input, list) else []
        if isinstance(request.input, str):
            own = [{"role": "user", "content": request.input}]
        body["input"] = as_model_input(history) + own
    if isinstance(body.get("input"), list) and has_compaction(body["input"]):
        body["input"] = expand_compactions(body["input"])
    return body


def first_events(snapshot: Json, *, queued: bool = False, starts_background: bool = False) -> list[Json]:
    """`response.created`, and for a run that starts at once `response.in_progress`, or for one that waits for
    capacity `response.queued`. A background run that starts at once is created `queued` (as OpenAI's are) and
    goes `in_progress` in the same step (`starts_background`), so its run calls the provider without another
    store round trip first. The events share `snapshot` (not copied: serialise them before it changes)."""
    if starts_background:
        created = {**snapshot, "status": ResponseStatus.QUEUED.value}
        return [
            {"type": "response.created", "response": created, "sequence_number": 0},
            {"type": "response.in_progress", "response": snapshot, "sequence_number": 1},
        ]
    types = ["response.created"]
    if snapshot["status"] == ResponseStatus.IN_PROGRESS:
        types.append("response.in_progress")
    elif queued:
        types.append("response.queued")
    return [{"type": kind, "response": snapshot, "sequence_number": number} for number, kind in enumerate(types)]


def new_response(
    request: CreateResponseRequest,
    *,
    conversation_id: str | None = None,
    owner: str = "",
    lease_ms: int = 15_000,
    tenant: str = "default",
    idempotency: tuple[str, str] | None = None,
    turn: str | None = None,
    queued: bool = False,
    shard: int | None = None,
) -> tuple[NewResponse, Json]:
    """The record admission creates (owned by `owner`, or queued for any instance when it is ""), and the
    snapshot the run starts from. `turn` is the conversation whose turn it takes; `idempotency` the (scope, key)
    that names it; `shard` the shard its id is made in (beside a response it changes in the same step)."""
    # Only a background response that waits for capacity (or one the gateway itself `queued`: a steered
    # response's successor) is stored `queued`; one this instance owns starts now.
    status = ResponseStatus.QUEUED if (request.is_background or queued) and not owner else ResponseStatus.IN_PROGRESS
    response_id = new_response_id()
    if idempotency is not None:  # made where its key's claim lives, so that one step can change both
        response_id = with_shard(response_id, idempotency_shard(*idempotency))
    elif shard is not None:
        response_id = with_shard(response_id, shard)
    snapshot = initial_snapshot(request, response_id=response_id, created_at=int(time.time()), status=status)
    if conversation_id is not None:
        snapshot["conversation"] = {"id": conversation_id}
    starts_background = request.is_background and bool(owner)
    events = [
        StoredEvent(e["sequence_number"], e["type"], stored_json(e))
        for e in first_events(snapshot, queued=not owner, starts_background=starts_background)
    ]
    record = NewResponse(
        response_id=snapshot["id"],
        snapshot=stored_json(snapshot),
        status=status.value,
        background=request.is_background,
        stored=request.is_stored,
        input_items=stored_json(normalise_items(request.input)),  # with the stable ids input_items lists
        events=events,
        request=request.model_dump_json(exclude_none=True).encode(),
        owner=owner,
        lease_ms=lease_ms,
        tenant=tenant,
        idempotency=idempotency,
        conversation_id=turn,
    )
    return record, snapshot
