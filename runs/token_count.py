"""`POST /v1/responses/input_tokens`: a request's input tokens, counted by the upstream it would run on."""

from __future__ import annotations

from typing import Any

import orjson

from runs.admission import check_history, upstream_body
from runs.errors import InvalidRequest
from runs.history import history_for, visible_previous_response
from runs.request import CreateResponseRequest, check_request_rules
from runs.token_estimate import estimate_tokens
from runs.upstream.base import TokenCount
from runs.upstream.router import UpstreamRouter
from storage.base import Store

# The response header that tells how the count was made: `upstream`, `tokenizer` or `estimate`. A header, not a
# field: the SDK's `InputTokenCountResponse` has none, and strict clients refuse fields it does not declare.
COUNT_SOURCE_HEADER = "X-Input-Tokens-Source"


async def count_input_tokens(
    store: Store, router: UpstreamRouter, request: CreateResponseRequest, *, tenant: str, client_key: str | None
) -> TokenCount:
    """The input tokens of `request` (a count request read as the create it stands for, history resolved),
    counted by its upstream: a `responses` provider's own `input_tokens` endpoint, a `chat` provider's
    tokenizer (`/tokenize` of vLLM and llama.cpp), else the gateway's estimate (`runs.token_estimate`); the
    `TokenCount` says which. InvalidRequest / NotFound for what a create with the same fields would refuse,
    before the provider is asked."""
    check_request_rules(request)
    history = await history_for(store, request, tenant=tenant)
    check_history(request, history)
    provider_body = upstream_body(request, history)
    upstream = router.route(request.model)
    counted = await upstream.count_input_tokens(provider_body, api_key=upstream.spec.call_key(client_key))
    return counted if counted is not None else TokenCount(estimate_tokens(provider_body), "estimate")


async def with_model(store: Store, body: dict[str, Any], *, tenant: str) -> dict[str, Any]:
    """The count request's body with a `model`: it may be left out when the request continues a previous
    response (whose model it then is); otherwise it names the upstream, so it is required."""
    if body.get("model") is None and isinstance(body.get("previous_response_id"), str):
        record = await visible_previous_response(store, body["previous_response_id"], tenant=tenant)
        body = {**body, "model": orjson.loads(record.snapshot).get("model")}
    if body.get("model") is None:
        raise InvalidRequest(
            "Missing required parameter: 'model'. The gateway routes token counting by model.",
            param="model",
            code="missing_required_parameter",
        )
    return body
