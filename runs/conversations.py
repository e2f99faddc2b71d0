"""Conversations: their API objects, their items, and the one-turn-at-a-time rule for responses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from runs.errors import Conflict, InvalidRequest, NotFound
from runs.ids import new_id
from runs.items import Json, check_input_items, normalise_items, stored_in_conversation
from runs.request import Metadata
from runs.status import CONTINUABLE, ResponseStatus
from storage.base import ConversationMissing, ConversationRecord, CursorNotFound, ResponseRecord, Store

MAX_INITIAL_ITEMS = 20
# A long conversation is read for a turn in pages of this size.
HISTORY_PAGE = 100


class CreateConversationRequest(BaseModel):
    """`POST /v1/conversations`."""

    model_config = ConfigDict(extra="allow", strict=True)
    items: Annotated[list[dict[str, Any]], Field(max_length=MAX_INITIAL_ITEMS)] | None = None
    metadata: Metadata | None = None


class UpdateConversationRequest(BaseModel):
    """`POST /v1/conversations/{id}`: only metadata can change."""

    model_config = ConfigDict(extra="allow", strict=True)
    metadata: Metadata


class AddItemsRequest(BaseModel):
    """`POST /v1/conversations/{id}/items`."""

    model_config = ConfigDict(extra="allow", strict=True)
    items: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_INITIAL_ITEMS)]


def conversation_not_found(conversation_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"Conversation with id '{conversation_id}' not found.", param=param)


def conversation_object(record: ConversationRecord) -> Json:
    """The Conversation as the API returns it."""
    return {
        "id": record.conversation_id,
        "object": "conversation",
        "created_at": record.created_at,
        "metadata": orjson.loads(record.metadata),
    }


def _check_items(items: list[Json]) -> None:
    for index, item in enumerate(items):
        if item["type"] == "message" and item.get("role") not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(
                "Message items need a role of user, assistant, system or developer.", param=f"items[{index}].role"
            )


def _pairs(items: list[Json]) -> list[tuple[str, bytes]]:
    return [(item["id"], orjson.dumps(item)) for item in items]


async def create_conversation(store: Store, request: CreateConversationRequest, *, tenant: str) -> Json:
    check_input_items(request.items or [], param="items")
    items = stored_in_conversation(normalise_items(request.items or []))
    _check_items(items)
    conversation_id = new_id("conv")
    created_at = int(time.time())
    metadata = orjson.dumps(request.metadata or {})
    await store.create_conversation(
        conversation_id, created_at=created_at, metadata=metadata, items=_pairs(items), tenant=tenant
    )
    return {
        "id": conversation_id,
        "object": "conversation",
        "created_at": created_at,
        "metadata": request.metadata or {},
    }


async def get_conversation(
    store: Store, conversation_id: str, *, tenant: str, param: str | None = None
) -> ConversationRecord:
    """The tenant's conversation. Another tenant's is answered exactly like one that does not exist."""
    record = await store.get_conversation(conversation_id)
    if record is None or record.tenant != tenant:
        raise conversation_not_found(conversation_id, param)
    return record


async def update_metadata(store: Store, conversation_id: str, metadata: Metadata, *, tenant: str) -> ConversationRecord:
    """Replace the metadata of the tenant's conversation; the conversation as it now is."""
    await get_conversation(store, conversation_id, tenant=tenant)
    try:
        await store.set_conversation_metadata(conversation_id, orjson.dumps(metadata))
    except ConversationMissing:
        raise conversation_not_found(conversation_id) from None
    return await get_conversation(store, conversation_id, tenant=tenant)


async def delete_conversation(store: Store, conversation_id: str, *, tenant: str) -> None:
    """Delete the tenant's conversation and every item of it."""
    await get_conversation(store, conversation_id, tenant=tenant)
    if not await store.delete_conversation(conversation_id):
        raise conversation_not_found(conversation_id)


def item_not_found(item_id: str) -> NotFound:
    return NotFound(f"Item with id '{item_id}' not found.", param="item_id")


async def get_item(store: Store, conversation_id: str, item_id: str, *, tenant: str) -> bytes:
    """One item of the tenant's conversation, as stored (JSON)."""
    await get_conversation(store, conversation_id, tenant=tenant)
    item = await store.get_conversation_item(conversation_id, item_id)
    if item is None:
        raise item_not_found(item_id)
    return item


async def delete_item(store: Store, conversation_id: str, item_id: str, *, tenant: str) -> ConversationRecord:
    """Delete one item of the tenant's conversation; the conversation, which the API answers with."""
    await get_conversation(store, conversation_id, tenant=tenant)
    try:
        deleted = await store.delete_conversation_item(conversation_id, item_id)
    except ConversationMissing:
        raise conversation_not_found(conversation_id) from None
    if not deleted:
        raise item_not_found(item_id)
    return await get_conversation(store, conversation_id, tenant=tenant)


async def active_response(store: Store, conversation_id: str, *, tenant: str) -> ResponseRecord:
    """The response running in the tenant's conversation, or 404 `no_active_response`."""
    record = await get_conversation(store, conversation_id, tenant=tenant)
    response_id = record.active_response_id
    response = None if response_id is None else await store.get_response(response_id)
    if response is None:
        raise NotFound(f"No response is running in conversation '{conversation_id}'.", code="no_active_response")
    return response


async def add_items(store: Store, conversation_id: str, request: AddItemsRequest, *, tenant: str) -> list[Json]:
    """Append items; refused (409) while a response is running in the conversation."""
    await get_conversation(store, conversation_id, tenant=tenant)
    check_input_items(request.items, param="items")
    items = stored_in_conversation(normalise_items(request.items))
    _check_items(items)
    try:
        busy = await store.append_conversation_items(conversation_id, _pairs(items))
    except ConversationMissing:
        raise conversation_not_found(conversation_id) from None
    if busy is not None:
        raise busy_error(busy)
    return items


async def list_items(
    store: Store, conversation_id: str, *, tenant: str, after: str | None, limit: int, order: str
) -> tuple[list[Json], bool]:
    """One page of the tenant's conversation's items, and whether more follow."""
    await get_conversation(store, conversation_id, tenant=tenant)
    try:
        page, has_more = await store.list_conversation_items(conversation_id, after=after, limit=limit, order=order)
    except CursorNotFound:
        raise InvalidRequest(f"No item with id '{after}' in this conversation.", param="after") from None
    return [orjson.loads(item) for item in page], has_more


async def all_items(store: Store, conversation_id: str, spend: Callable[[int, int], None] | None = None) -> list[Json]:
    """Every item, oldest first (the history a turn gives the model); `spend(bytes, items)` is told of each page
    before it is parsed, and may refuse it by raising."""
    items: list[Json] = []
    after = None
    while True:
        page, has_more = await store.list_conversation_items(
            conversation_id, after=after, limit=HISTORY_PAGE, order="asc"
        )
        if spend is not None:
            spend(sum(len(item) for item in page), len(page))
        items += [orjson.loads(item) for item in page]
        if not has_more or not page:
            return items
        after = items[-1]["id"]


def busy_error(active_response_id: str) -> Conflict:
    """409 while another response runs in the conversation; the SDK must not retry it blindly."""
    return Conflict(
        f"Another response ({active_response_id}) is in progress in this conversation; wait for it to finish.",
        param="conversation",
        code="conversation_busy",
        headers={"x-should-retry": "false"},
    )


async def end_turn(
    store: Store, conversation_id: str, response_id: str, *, status: str, input_items: list[Json], output: list[Json]
) -> None:
    """Release the turn; a completed or incomplete response's input and output (so far) join the conversation in
    the same step, as at OpenAI, and a completed one becomes the conversation's latest completed response. Failed
    and cancelled turns add nothing."""
    completed = status == ResponseStatus.COMPLETED
    items = stored_in_conversation(input_items + output) if ResponseStatus(status) in CONTINUABLE else []
    try:
        await store.end_conversation_turn(conversation_id, response_id, completed=completed, items=_pairs(items))
    except ConversationMissing:
        return  # deleted while the response ran
