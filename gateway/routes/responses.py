"""`/v1/responses`: create, retrieve (JSON or SSE)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.errors import invalid_body, raw_json_response
from gateway.sse import error_frame, open_stream, write_events
from gateway.state import RUN_MANAGER, STORE
from runs.errors import ApiError, InvalidRequest, UpstreamError, response_not_found
from runs.request import CreateResponseRequest
from runs.run import ResponseRun
from runs.subscription import follow_events
from storage.base import ResponseRecord, Store

log = logging.getLogger(__name__)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"Invalid value for '{name}': expected true or false.", param=name)
    return value in ("true", "1")


def _query_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{name}': expected an integer.", param=name) from None


async def _visible_record(store: Store, response_id: str) -> ResponseRecord:
    """The stored response, or the 404 OpenAI gives for an unknown id (store=false responses are never visible)."""
    record = await store.get_response(response_id)
    if record is None or not record.stored:
        raise response_not_found(response_id)
    return record


def _upstream_refusal(run: ResponseRun) -> ApiError | None:
    """For a synchronous request whose upstream refused before any output, the error the caller would have got
    from the provider directly (a failed Response with 200 would hide a 400 or 429)."""
    failure = run.failure
    if failure is None or run.emitted_output:
        return None
    if failure.status is not None and 400 <= failure.status < 500:
        error = ApiError(failure.message, code=failure.code)
        error.status = failure.status
        error.type = "rate_limit_error" if failure.status == 429 else "invalid_request_error"
        return error
    return UpstreamError(failure.message)


async def _stream_response(request: web.Request, store: Store, response_id: str, after: int) -> web.StreamResponse:
    response = await open_stream(request)
    last = after
    try:
        last = await write_events(response, follow_events(store, response_id, after))
    except ConnectionResetError:
        log.debug("subscriber of %s went away", response_id)
        return response
    except Exception:
        log.exception("stream of %s broke", response_id)
        await response.write(error_frame("server_error", "The event stream was interrupted; reconnect.", last + 1))
    await response.write_eof()
    return response


async def create_response(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses."""
    body = await read_json_object(request)
    try:
        create = CreateResponseRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_body(error) from None
    manager = request.app[RUN_MANAGER]
    store = request.app[STORE]
    run = await manager.admit(create)
    if not create.is_stored:
        # Connection-owned: the run ends with this handler (client gone → handler cancelled → run cancelled).
        try:
            return await _serve_created(request, store, run, create)
        finally:
            manager.release_connection_owned(run)
    return await _serve_created(request, store, run, create)


async def _serve_created(
    request: web.Request, store: Store, run: ResponseRun, create: CreateResponseRequest
) -> web.StreamResponse:
    if create.is_streaming:
        return await _stream_response(request, store, run.response_id, -1)
    if not create.is_background:
        await run.wait_finished()
        refusal = _upstream_refusal(run)
        if refusal is not None:
            raise refusal
    record = await store.get_response(run.response_id)
    if record is None:
        raise ApiError("The response was lost before it could be returned.")
    return raw_json_response(record.snapshot)


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """GET /v1/responses/{response_id}: the snapshot, or with `stream=true` its events after `starting_after`."""
    response_id = request.match_info["response_id"]
    stream = _query_flag(request, "stream")
    starting_after = _query_int(request, "starting_after")
    store = request.app[STORE]
    await _visible_record(store, response_id)
    if stream:
        return await _stream_response(request, store, response_id, -1 if starting_after is None else starting_after)
    record = await _visible_record(store, response_id)
    return raw_json_response(record.snapshot)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
