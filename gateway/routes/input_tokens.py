"""`POST /v1/responses/input_tokens` (the SDK's `responses.input_tokens.count`)."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from gateway.auth import PRINCIPAL
from gateway.errors import invalid_body, json_response, logged_refusal
from gateway.request_id import request_id_of
from gateway.routes.responses import read_json_object
from gateway.state import ROUTER, RUN_MANAGER, STORE
from runs.request import CreateResponseRequest
from runs.token_count import COUNT_SOURCE_HEADER, count_input_tokens, with_model
from runs.upstream.base import UpstreamFailure


async def count_tokens(request: web.Request) -> web.Response:
    """The input tokens a create with the same body would send, as its upstream counts them."""
    principal = request[PRINCIPAL]
    store = request.app[STORE]
    body = await with_model(store, await read_json_object(request), tenant=principal.tenant)
    try:
        count_request = CreateResponseRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_body(error) from None
    manager = request.app[RUN_MANAGER]
    try:
        async with manager.model_call_outside_a_run(principal.tenant, principal.max_concurrent_runs):
            counted = await count_input_tokens(
                store, request.app[ROUTER], count_request, tenant=principal.tenant, client_key=principal.api_key
            )
    except UpstreamFailure as failure:
        raise logged_refusal(failure, request_id_of(request)) from None
    return json_response(
        {"object": "response.input_tokens", "input_tokens": counted.input_tokens},
        headers={COUNT_SOURCE_HEADER: counted.source},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses/input_tokens", count_tokens)
