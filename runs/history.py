"""What a turn gives the model besides its own input: the conversation so far, or the previous responses."""

from __future__ import annotations

import logging

import orjson

from runs.conversations import all_items, get_conversation
from runs.errors import Conflict, InvalidRequest, NotFound
from runs.items import Json
from runs.request import CreateResponseRequest
from runs.status import CONTINUABLE, ResponseStatus
from storage.base import ResponseRecord, Store

log = logging.getLogger(__name__)

# A previous_response_id chain is followed this far back at most.
MAX_CHAIN_LENGTH = 1000


def conversation_id_of(request: CreateResponseRequest) -> str | None:
    """`conversation` given as a string or as `{id}`."""
    if request.conversation is None:
        return None
    return request.conversation if isinstance(request.conversation, str) else request.conversation.id


async def visible_previous_response(store: Store, previous_response_id: str, *, tenant: str) -> ResponseRecord:
    """The tenant's stored response named by `previous_response_id`; 404 `previous_response_not_found` for one
    that is missing, not stored, or another tenant's (alike: existence is not told across tenants)."""
    record = await store.get_response(previous_response_id)
    if record is None or not record.stored or record.tenant != tenant:
        raise NotFound(
            f"Previous response with id '{previous_response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return record


async def previous_response_history(store: Store, previous_response_id: str, *, tenant: str) -> list[Json]:
    """Inputs and outputs of every response in the chain ending at `previous_response_id`, oldest first.

    A `completed` or `incomplete` response can be continued (an incomplete one's output so far is history, as at
    OpenAI: a turn cut by `max_output_tokens` is continued, not lost). One still running has no final output yet
    (409, and the SDK is told not to retry blindly), and a failed or cancelled one is not a checkpoint to build on
    (400). Instructions are not carried over, as in the OpenAI API.
    """
    record = await visible_previous_response(store, previous_response_id, tenant=tenant)
    status = ResponseStatus(record.status)
    if status in (ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS):
        raise Conflict(
            f"Previous response with id '{previous_response_id}' is still in progress; wait for it to complete.",
            param="previous_response_id",
            code="previous_response_in_progress",
            headers={"x-should-retry": "false"},
        )
    if status not in CONTINUABLE:
        raise InvalidRequest(
            f"Previous response with id '{previous_response_id}' is {status.value}; only a completed or incomplete "
            "response can be continued.",
            param="previous_response_id",
            code="previous_response_not_completed",
        )
    segments: list[list[Json]] = []
    current: str | None = previous_response_id
    while current is not None and len(segments) < MAX_CHAIN_LENGTH:
        link = await store.get_response(current)
        inputs = await store.get_input_items(current)
        if link is None or inputs is None:
            log.warning("history of %s stops at %s, which no longer exists", previous_response_id, current)
            break
        snapshot = orjson.loads(link.snapshot)
        segments.append(orjson.loads(inputs) + snapshot.get("output", []))
        current = snapshot.get("previous_response_id")
    return [item for segment in reversed(segments) for item in segment]


async def history_for(store: Store, request: CreateResponseRequest, *, tenant: str) -> list[Json]:
    """The items before the request's own input: a conversation's, or a previous_response_id chain's."""
    conversation_id = conversation_id_of(request)
    if conversation_id is not None:
        await get_conversation(store, conversation_id, tenant=tenant, param="conversation")
        return await all_items(store, conversation_id)
    if request.previous_response_id is not None:
        return await previous_response_history(store, request.previous_response_id, tenant=tenant)
    return []
