"""`/v1/conversations`: the Conversations API, and reattach to a conversation's running response."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.auth import PRINCIPAL
from gateway.errors import invalid_body, json_response, raw_json_response
from gateway.pagination import PageQuery, list_object
from gateway.routes.responses import query_flag, read_json_object, resume_cursor, resume_stream
from gateway.state import STORE
from runs import conversations
from runs.conversations import (
    AddItemsRequest,
    CreateConversationRequest,
    UpdateConversationRequest,
    conversation_object,
)

_Body = TypeVar("_Body", bound=BaseModel)


def _tenant(request: web.Request) -> str:
    return request[PRINCIPAL].tenant


async def _body(request: web.Request, model: type[_Body]) -> _Body:
    try:
        return model.model_validate(await read_json_object(request))
    except ValidationError as error:
        raise invalid_body(error) from None


async def create_conversation(request: web.Request) -> web.Response:
    """POST /v1/conversations (up to 20 initial items, metadata)."""
    body = await _body(request, CreateConversationRequest)
    return json_response(await conversations.create_conversation(request.app[STORE], body, tenant=_tenant(request)))


async def retrieve_conversation(request: web.Request) -> web.Response:
    record = await conversations.get_conversation(
        request.app[STORE], request.match_info["conversation_id"], tenant=_tenant(request)
    )
    return json_response(conversation_object(record))


async def update_conversation(request: web.Request) -> web.Response:
    """POST /v1/conversations/{id}: replace the metadata."""
    conversation_id, store, tenant = request.match_info["conversation_id"], request.app[STORE], _tenant(request)
    # An unknown conversation is a 404 even when the body is bad too.
    await conversations.get_conversation(store, conversation_id, tenant=tenant)
    body = await _body(request, UpdateConversationRequest)
    record = await conversations.update_metadata(store, conversation_id, body.metadata, tenant=tenant)
    return json_response(conversation_object(record))


async def delete_conversation(request: web.Request) -> web.Response:
    """DELETE /v1/conversations/{id}: the conversation and every item of it."""
    conversation_id = request.match_info["conversation_id"]
    await conversations.delete_conversation(request.app[STORE], conversation_id, tenant=_tenant(request))
    return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def list_items(request: web.Request) -> web.Response:
    """GET /v1/conversations/{id}/items: a cursor page (`after`, `limit` 1-100, `order`, default `desc`)."""
    query = PageQuery.from_query(request.query)
    data, has_more = await conversations.list_items(
        request.app[STORE],
        request.match_info["conversation_id"],
        tenant=_tenant(request),
        after=query.after,
        limit=query.limit,
        order=query.order,
    )
    return json_response(list_object(data, has_more=has_more))


async def add_items(request: web.Request) -> web.Response:
    """POST /v1/conversations/{id}/items (up to 20)."""
    body = await _body(request, AddItemsRequest)
    items = await conversations.add_items(
        request.app[STORE], request.match_info["conversation_id"], body, tenant=_tenant(request)
    )
    return json_response(list_object(items, has_more=False))


async def retrieve_item(request: web.Request) -> web.Response:
    conversation_id, item_id = request.match_info["conversation_id"], request.match_info["item_id"]
    item = await conversations.get_item(request.app[STORE], conversation_id, item_id, tenant=_tenant(request))
    return raw_json_response(item)


async def delete_item(request: web.Request) -> web.Response:
    """DELETE /v1/conversations/{id}/items/{item_id}: answers with the conversation, as the API does."""
    conversation_id, item_id = request.match_info["conversation_id"], request.match_info["item_id"]
    record = await conversations.delete_item(request.app[STORE], conversation_id, item_id, tenant=_tenant(request))
    return json_response(conversation_object(record))


async def active_response(request: web.Request) -> web.StreamResponse:
    """GET /v1/conversations/{id}/active_response (our extension): the response running in the conversation,
    as JSON or, with `stream=true` (and `starting_after` / Last-Event-ID), as its event stream."""
    conversation_id = request.match_info["conversation_id"]
    stream = query_flag(request, "stream")
    cursor, cursor_epoch = resume_cursor(request)
    response = await conversations.active_response(request.app[STORE], conversation_id, tenant=_tenant(request))
    if stream:
        return await resume_stream(request, response, cursor, cursor_epoch)
    return raw_json_response(response.snapshot)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}", retrieve_conversation)
    app.router.add_post("/v1/conversations/{conversation_id}", update_conversation)
    app.router.add_delete("/v1/conversations/{conversation_id}", delete_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}/items", list_items)
    app.router.add_post("/v1/conversations/{conversation_id}/items", add_items)
    app.router.add_get("/v1/conversations/{conversation_id}/items/{item_id}", retrieve_item)
    app.router.add_delete("/v1/conversations/{conversation_id}/items/{item_id}", delete_item)
    app.router.add_get("/v1/conversations/{conversation_id}/active_response", active_response)
