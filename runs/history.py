"""What a turn gives the model besides its own input: the conversation so far, or the previous responses."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from runs.conversations import all_items, get_conversation
from runs.errors import Conflict, InvalidRequest, NotFound
from runs.items import Json
from runs.request import CreateResponseRequest
from runs.status import CONTINUABLE, ResponseStatus
from storage.base import ResponseRecord, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HistoryBounds:
    """How much history one request may bring in (config `limits`): it is read from the store, held in memory and
    sent to the provider on every turn, so a few small requests continuing a huge chain must not multiply it.
    Bytes are counted as stored (each link's input items and Response, each conversation item's JSON)."""

    max_bytes: int = 16 * 1024 * 1024
    max_items: int = 10_000
    max_chain_length: int = 256


class _Budget:
    """What is left of the bounds while a history is read; a 400 naming `param` once it is spent."""

    def __init__(self, bounds: HistoryBounds, param: str) -> None:
        self._bounds = bounds
        self._param = param
        self._bytes = 0
        self._items = 0

    def spend(self, size: int, items: int) -> None:
        self._bytes += size
        self._items += items
        if self._bytes > self._bounds.max_bytes or self._items > self._bounds.max_items:
            raise InvalidRequest(
                f"The history that '{self._param}' brings in is larger than this gateway allows (at most "
                f"{self._bounds.max_bytes} bytes and {self._bounds.max_items} items); start a new one, or compact "
                "it first (POST /v1/responses/compact).",
                param=self._param,
                code="history_too_large",
            )


def conversation_id_of(request: CreateResponseRequest) -> str | None:
    """`conversation` given as a string or as `{id}`."""
    if request.conversation is None:
        return None
    return request.conversation if isinstance(request.conversation, str) else request.conversation.id


async def visible_previous_response(store: Store, previous_response_id: str, *, tenant: str) -> ResponseRecord:
    """The tenant's stored response named by `previous_response_id`; 404 `previous_response_not_found` for one
    that is missing, not stored, or another tenant's (alike: existence is not told across tenants)."""
    record = await store.get_response(previous_response_id, tenant=tenant)
    if record is None or not record.stored or record.tenant != tenant:
        raise NotFound(
            f"Previous response with id '{previous_response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return record


async def previous_response_history(
    store: Store, previous_response_id: str, *, tenant: str, bounds: HistoryBounds | None = None
) -> list[Json]:
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
    bounds = bounds or HistoryBounds()
    budget = _Budget(bounds, "previous_response_id")
    segments: list[list[Json]] = []
    current: str | None = previous_response_id
    while current is not None:
        if len(segments) >= bounds.max_chain_length:
            raise InvalidRequest(
                f"The previous_response_id chain is longer than this gateway follows ({bounds.max_chain_length} "
                "responses); start a new one, or compact it first (POST /v1/responses/compact).",
                param="previous_response_id",
                code="history_too_large",
            )
        link = await store.get_response(current)
        inputs = await store.get_input_items(current)
        if link is None or inputs is None:
            log.warning("history of %s stops at %s, which no longer exists", previous_response_id, current)
            break
        snapshot = orjson.loads(link.snapshot)
        segment = orjson.loads(inputs) + snapshot.get("output", [])
        budget.spend(len(inputs) + len(link.snapshot), len(segment))
        segments.append(segment)
        current = snapshot.get("previous_response_id")
    return [item for segment in reversed(segments) for item in segment]


async def history_for(
    store: Store, request: CreateResponseRequest, *, tenant: str, bounds: HistoryBounds | None = None
) -> list[Json]:
    """The items before the request's own input: a conversation's, or a previous_response_id chain's (400
    `history_too_large` beyond `bounds`)."""
    bounds = bounds or HistoryBounds()
    conversation_id = conversation_id_of(request)
    if conversation_id is not None:
        await get_conversation(store, conversation_id, tenant=tenant, param="conversation")
        return await all_items(store, conversation_id, _Budget(bounds, "conversation").spend)
    if request.previous_response_id is not None:
        return await previous_response_history(store, request.previous_response_id, tenant=tenant, bounds=bounds)
    return []
