"""Stored responses as the API exposes them: what a tenant may read, delete and page through."""

from __future__ import annotations

import orjson

from runs.errors import InvalidRequest, response_not_found
from runs.items import Json
from storage.base import DeleteOutcome, ResponseRecord, Store


async def visible_response(store: Store, response_id: str, *, tenant: str) -> ResponseRecord:
    """The tenant's stored response, or the 404 OpenAI gives for an unknown id: a `store=false` response, and
    another tenant's, are answered exactly like one that does not exist."""
    record = await store.get_response(response_id, tenant=tenant)
    if record is None or not record.stored or record.tenant != tenant:
        raise response_not_found(response_id)
    return record


async def delete_response(store: Store, response_id: str, *, tenant: str) -> None:
    """Delete every key of the tenant's response; refused (400) while it runs, 404 when it is not visible."""
    await visible_response(store, response_id, tenant=tenant)
    outcome = await store.delete_response(response_id)
    if outcome is DeleteOutcome.ACTIVE:
        raise InvalidRequest(
            "Cannot delete an in-flight response; cancel it first or wait for it to finish.",
            code="response_in_progress",
        )
    if outcome is DeleteOutcome.MISSING:
        raise response_not_found(response_id)


async def input_items(store: Store, response_id: str, *, tenant: str) -> list[Json]:
    """The input items of the tenant's response, oldest first; 404 when it is not visible."""
    await visible_response(store, response_id, tenant=tenant)
    raw = await store.get_input_items(response_id)
    if raw is None:
        raise response_not_found(response_id)
    items: list[Json] = orjson.loads(raw)
    return items
