"""`POST /v1/responses/input_tokens`: how many tokens a request's input would take, counted where it would run.

The request is the one `responses.create` would send (with `previous_response_id` or `conversation` resolved to
the history the gateway keeps), routed by `model` like a create. Its upstream counts it: a `responses` provider
with its own `input_tokens` endpoint, or a `chat` provider's tokenizer (`/tokenize`, as vLLM and llama.cpp serve
it). Where the provider offers neither, the gateway estimates (`runs.token_estimate`: about four characters of the
request's JSON per token). The answer says which in `COUNT_SOURCE_HEADER`.
"""

from __future__ import annotations

from typing import Any

import orjson

from runs.admission import check_history, upstream_body
from runs.errors import InvalidRequest
from runs.history import history_for
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
    """The input tokens of `request` (a count request read as the create it stands for, see `with_model`);
    InvalidRequest / NotFound for what a create with the same fields would refuse, before the provider is asked."""
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
        record = await store.get_response(body["previous_response_id"])
        if record is not None and record.stored and record.tenant == tenant:
            body = {**body, "model": orjson.loads(record.snapshot).get("model")}
    if body.get("model") is None:
        raise InvalidRequest(
            "Missing required parameter: 'model'. The gateway routes token counting by model.",
            param="model",
            code="missing_required_parameter",
        )
    return body
