"""`POST /v1/responses/compact` (the SDK's `responses.compact`)."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from gateway.auth import PRINCIPAL
from gateway.errors import invalid_body, json_response, logged_refusal
from gateway.request_id import request_id_of
from gateway.routes.responses import read_json_object
from gateway.state import ROUTER, RUN_MANAGER, STORE
from runs.compaction import CompactRequest, compact
from runs.upstream.base import UpstreamFailure


async def compact_context(request: web.Request) -> web.Response:
    """The compacted window of a context: the user's messages and one `compaction` item."""
    try:
        compact_request = CompactRequest.model_validate(await read_json_object(request))
    except ValidationError as error:
        raise invalid_body(error) from None
    principal = request[PRINCIPAL]
    manager = request.app[RUN_MANAGER]
    try:
        async with manager.model_call_outside_a_run(principal.tenant, principal.max_concurrent_runs):
            compacted = await compact(
                request.app[STORE],
                request.app[ROUTER],
                compact_request,
                tenant=principal.tenant,
                client_key=principal.api_key,
            )
    except UpstreamFailure as failure:
        raise logged_refusal(failure, request_id_of(request)) from None
    return json_response(compacted)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses/compact", compact_context)
