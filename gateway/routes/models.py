"""`/v1/models`: what this gateway can route."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import json_response
from gateway.state import ROUTER


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models, in the OpenAI list shape; `owned_by` names the upstream that serves each model."""
    models = await request.app[ROUTER].routable_models()
    data = [{"id": model.id, "object": "model", "created": 0, "owned_by": model.upstream} for model in models]
    return json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: the model if it is routable (an unlisted name a glob admits is routable too)."""
    model_id = request.match_info["model"]
    upstream = request.app[ROUTER].route(model_id)  # 404 model_not_found when nothing serves it
    return json_response({"id": model_id, "object": "model", "created": 0, "owned_by": upstream.spec.name})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
