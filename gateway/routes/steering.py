"""Steering over HTTP (a gateway extension; WebSocket clients send `response.steer`): queue user input for a
running background response, and see what became of it."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import PRINCIPAL
from gateway.errors import json_response
from gateway.routes.responses import read_json_object
from gateway.state import ROUTER, SETTINGS, STORE
from gateway.websocket import steerable_models
from runs import responses, steering
from runs.errors import InvalidRequest


async def steer_response(request: web.Request) -> web.Response:
    """POST /v1/responses/{response_id}/steer with `{"input": ...}` (the input `response.steer` takes): 200 once
    the input is stored; the response stops at its next safe boundary and a successor continues with it."""
    response_id = request.match_info["response_id"]
    body = await read_json_object(request)
    unknown = sorted(set(body) - {"input"})
    if unknown:
        raise InvalidRequest(
            f"Unknown parameter: '{unknown[0][:64]}'.", param=unknown[0][:64], code="unknown_parameter"
        )
    accepted = await steering.queue_steer(
        request.app[STORE],
        response_id,
        body.get("input"),
        tenant=request[PRINCIPAL].tenant,
        max_pending=request.app[SETTINGS].steering.max_pending_per_response,
        steerable=steerable_models(request.app[ROUTER]),
    )
    return json_response(
        {
            "object": "response.steer",
            "id": accepted.steer_id,
            "previous_response_id": response_id,
            "status": "accepted",
        }
    )


async def steering_state(request: web.Request) -> web.Response:
    """GET /v1/responses/{response_id}/steering: the steering queued for the response and what became of it: the
    successor that continues with it, or `pending` (the response waits for tool outputs; the client's own
    continuation gets the input first), or `failed`."""
    response_id = request.match_info["response_id"]
    store = request.app[STORE]
    await responses.visible_response(store, response_id, tenant=request[PRINCIPAL].tenant)
    return json_response(await steering.steering_summary(store, response_id))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses/{response_id}/steer", steer_response)
    app.router.add_get("/v1/responses/{response_id}/steering", steering_state)
