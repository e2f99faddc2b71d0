"""The one place exceptions become HTTP responses in the OpenAI error envelope."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from gateway.request_id import request_id_of
from runs.errors import ApiError, InvalidRequest, NotFound, PayloadTooLarge, Unavailable, UpstreamError
from runs.store import StoreUnavailable
from runs.subscription import RESPONSE_ID_HEADER
from runs.upstream.base import UpstreamFailure

log = logging.getLogger(__name__)

# The body size limit, for the 413 message (the app sets it from server.max_body_bytes).
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def raw_json_response(body: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A response whose body is already JSON (a stored snapshot): served byte for byte."""
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def error_response(error: ApiError) -> web.Response:
    response = json_response(error.envelope(), status=error.status, headers=error.headers or None)
    if error.status == 408:
        response.force_close()  # the rest of a body that stopped coming is not waited for
    return response


def _param_of(location: tuple[int | str, ...]) -> str:
    """pydantic's error location as OpenAI writes a param: `input[0].content`."""
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not param:
            param = part
        elif part in (
            "str",
            "list[dict[str,any]]",
            "ConversationRef",
            "dict[str,any]",
            "int",
            "float",
            "bool",
        ):
            continue  # union branch names pydantic adds to the path
        else:
            param += f".{part}"
    return param


def invalid_body(error: ValidationError) -> InvalidRequest:
    """A 400 for the first problem pydantic found, naming its param."""
    first = error.errors(include_url=False)[0]
    param = _param_of(tuple(first["loc"]))
    kind = first["type"]
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    value = first.get("input")
    shown = orjson.dumps(value).decode()[:100] if isinstance(value, (str, int, float, bool, type(None))) else None
    detail = first["msg"][0].lower() + first["msg"][1:]
    message = (
        f"Invalid value for '{param}': {detail}."
        if shown is None
        else f"Invalid value {shown} for '{param}': {detail}."
    )
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return InvalidRequest(message, param=param, code=code)


# Provider statuses that describe the client's request, passed on as they are. Others (401/403/404 from the
# provider mean the gateway's own credentials or configuration are wrong) become 502.
_CLIENT_FAULT_STATUSES = {
    400: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def logged_refusal(failure: UpstreamFailure, request_id: str) -> ApiError:
    """`upstream_refusal` for a provider call made outside a run (compaction, token counts): the provider's full
    text is logged here, under the request's id (a run logs its own)."""
    log.warning("request %s: upstream failed: %s", request_id, failure.detail or failure.message)
    return upstream_refusal(failure)


def upstream_refusal(failure: UpstreamFailure, response_id: str | None = None) -> ApiError:
    """The error a synchronous caller gets when the provider refused the turn before any output: what it would
    have got from the provider directly (a failed Response with 200 would hide a 400 or a 429), with the message
    cleaned of the provider's internals. The failed response is stored all the same (its events were seen by any
    follower): `x-response-id` names it, so it is never one nobody was told of."""
    headers = {RESPONSE_ID_HEADER: response_id} if response_id is not None else None
    if failure.status in _CLIENT_FAULT_STATUSES:
        kind = _CLIENT_FAULT_STATUSES[failure.status]
        return ApiError(failure.message, code=failure.code, status=failure.status, type=kind, headers=headers)
    return UpstreamError(failure.message, headers=headers)


def store_unavailable() -> Unavailable:
    """What a client is told when the store cannot be reached (HTTP 503, or a WebSocket `error` event)."""
    return Unavailable("The gateway's store is unavailable; retry shortly.", headers={"Retry-After": "1"})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError → its envelope; aiohttp's HTTP errors → the same envelope; anything else → 500, logged."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except StoreUnavailable as error:
        log.warning(
            "request %s: store unavailable on %s %s: %s", request_id_of(request), request.method, request.path, error
        )
        return error_response(store_unavailable())
    except web.HTTPException as error:
        if error.status == 413:
            limit = request.app[MAX_BODY_BYTES]
            return error_response(PayloadTooLarge(f"The request body is larger than the {limit}-byte limit."))
        if error.status == 404:
            return error_response(
                NotFound(
                    f"Unknown request URL: {request.method} {request.path}. Please check the URL for typos.",
                    code="unknown_url",  # as OpenAI's own 404 for a path it does not serve
                )
            )
        if isinstance(error, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(error.allowed_methods))
            return error_response(
                ApiError(
                    f"Method {request.method} is not allowed for {request.path}; allowed: {allowed}.",
                    status=405,
                    type="invalid_request_error",
                    code="method_not_allowed",
                    headers={"Allow": allowed},
                )
            )
        if error.status < 400:
            raise
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return error_response(ApiError(error.reason, status=error.status, type=kind))
    except Exception:
        log.exception("request %s: unhandled error on %s %s", request_id_of(request), request.method, request.path)
        return error_response(ApiError("The server had an error while processing your request."))
