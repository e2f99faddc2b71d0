"""`/v1/responses`: create, retrieve (JSON or SSE), cancel, delete, input items."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import ValidationError

from gateway.access_log import RESPONSE_ID
from gateway.auth import PRINCIPAL
from gateway.cursors import is_cursor_part
from gateway.errors import invalid_body, json_response, raw_json_response, upstream_refusal
from gateway.gc_pacing import FIRST_OUTPUT_WRITTEN, create_waiting
from gateway.json_depth import MAX_JSON_DEPTH, nesting_depth
from gateway.pagination import PageQuery
from gateway.request_id import request_id_of
from gateway.sse import DirectWrites, StreamSettings, open_stream, write_events
from gateway.state import LIVE_EVENTS, RUN_MANAGER, SETTINGS, STORE
from gateway.websocket import responses_socket
from runs import idempotency, responses
from runs.errors import InvalidRequest, RequestTimeout
from runs.manager import Admission
from runs.request import INCLUDABLE, CreateResponseRequest
from runs.store import ResponseRecord, Store, StoredEvent
from runs.subscription import check_resume_point, follow_events, until_ended, wait_for_end

log = logging.getLogger(__name__)

REPLAYED_HEADER = "Idempotent-Replayed"


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    server = request.app[SETTINGS].server
    # The body's length as far as it can be: a Content-Length past the limit (a lie, or a body refused anyway)
    # gains no time.
    length = min(request.content_length or server.max_body_bytes, server.max_body_bytes)
    try:
        # A floor on the body's pace: a client that stops half-way does not hold the request forever. A body that
        # has all arrived (most bodies) has nothing to wait for: no deadline, so no timer is set.
        deadline = server.body_timeout_seconds + length / server.min_body_bytes_per_second
        async with asyncio.timeout(None if request.content.is_eof() else deadline):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            "The body of your request did not arrive in time; send it at once, at a steady pace."
        ) from None
    except RequestPayloadError:
        # A body its Content-Encoding does not decode (a plain body sent as gzip), or one cut off mid-chunk.
        encoding = request.headers.get("Content-Encoding", "identity")[:32]
        raise InvalidRequest(
            f"We could not read the body of your request (Content-Encoding: {encoding}).", code="invalid_body"
        ) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if nesting_depth(body) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json"
        )
    return body


def query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"Invalid value for '{name}': expected true or false.", param=name)
    return value in ("true", "1")


def _stream_settings(request: web.Request) -> StreamSettings:
    sse = request.app[SETTINGS].sse
    return StreamSettings(
        heartbeat_seconds=sse.heartbeat_seconds,
        retry_ms=sse.retry_ms,
        write_timeout_seconds=sse.write_timeout_seconds,
        socket_send_buffer_bytes=sse.socket_send_buffer_bytes,
    )


async def stream_response(
    request: web.Request,
    response_id: str,
    after: int,
    headers: dict[str, str] | None = None,
    *,
    known: Sequence[StoredEvent] = (),
    after_epoch: int | None = None,
) -> web.StreamResponse:
    """Replay the stored events after `after` (of epoch `after_epoch`, when the client's cursor says: starting with
    `known` ones, which need no reading), then follow live ones until the terminal event."""
    settings = _stream_settings(request)
    live = request.app[LIVE_EVENTS]
    # Subscribed before the first await, so nothing stored after `known` can be missed.
    subscription = live.subscribe(response_id)
    direct = DirectWrites(request)
    events = follow_events(
        request.app[STORE],
        live,
        response_id,
        after,
        idle_seconds=settings.heartbeat_seconds,
        known=known,
        subscription=subscription,
        after_epoch=after_epoch,
        direct=direct,
    )
    try:
        response = await open_stream(request, settings, headers, events_at_hand=bool(known))
    except BaseException:
        live.unsubscribe(subscription)  # the follower never started: its own `finally` will not
        raise
    async with contextlib.aclosing(events):  # unsubscribe at once when the client goes
        await write_events(request, response, events, settings, direct)
    return response


async def create_response(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses."""
    create, key = await _read_create(request)
    if not create.is_streaming:  # nobody sees a first output before the whole response (or none, in background)
        return await _start_create(request, create, key)
    # Until the stream's first output is written, collections are held back (gateway/gc_pacing.py); a request that
    # ends without one stops waiting then.
    first_output_written = request[FIRST_OUTPUT_WRITTEN] = create_waiting(request.app)
    try:
        return await _start_create(request, create, key)
    finally:
        first_output_written()


async def _read_create(request: web.Request) -> tuple[CreateResponseRequest, idempotency.IdempotencyKey | None]:
    """The create request and its Idempotency-Key, checked; a 400 for anything wrong with either."""
    key_header = request.headers.get(idempotency.HEADER)
    if key_header is not None:
        idempotency.check_key(key_header)  # before anything else, as the IETF draft asks
    body = await read_json_object(request)
    try:
        create = CreateResponseRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_body(error) from None
    if create.stream_id is not None:
        raise InvalidRequest(
            "Unknown parameter: 'stream_id' (it is WebSocket mode's: send response.create on GET /v1/responses).",
            param="stream_id",
            code="unknown_parameter",
        )
    principal = request[PRINCIPAL]
    key = None
    if key_header is not None:
        ttl_seconds = request.app[SETTINGS].idempotency.ttl_seconds
        key = idempotency.IdempotencyKey.for_request(
            key_header, create, ttl_seconds=ttl_seconds, scope=principal.tenant
        )
    return create, key


async def _start_create(
    request: web.Request, create: CreateResponseRequest, key: idempotency.IdempotencyKey | None
) -> web.StreamResponse:
    """Admit the create and serve what it started (or what its Idempotency-Key started before)."""
    principal = request[PRINCIPAL]
    manager = request.app[RUN_MANAGER]
    admission = await manager.admit(
        create,
        tenant=principal.tenant,
        idempotency=key,
        api_key=principal.api_key,
        max_tenant_runs=principal.max_concurrent_runs,
        request_id=request_id_of(request),
    )
    request[RESPONSE_ID] = admission.response_id
    if admission.run is None:  # replayed, or queued for whichever instance has room first
        return await _serve_by_id(request, admission.response_id, create, replayed=admission.replayed)
    run = admission.run
    store = request.app[STORE]
    if not create.is_stored:
        # Connection-owned: the run ends with this handler (client gone → handler cancelled → run cancelled).
        try:
            return await _serve_created(request, store, admission, create, key)
        finally:
            manager.release_connection_owned(run)
    return await _serve_created(request, store, admission, create, key)


async def _serve_by_id(
    request: web.Request, response_id: str, create: CreateResponseRequest, *, replayed: bool
) -> web.StreamResponse:
    """Serve a response this request did not start here: a retry with a used Idempotency-Key gets exactly what
    the first request gets (the same stream from its first event, or the same Response), and a queued one is
    followed like any other."""
    headers = {REPLAYED_HEADER: "true"} if replayed else {}
    if create.is_streaming:
        return await stream_response(request, response_id, -1, headers)
    store = request.app[STORE]
    if not create.is_background:
        await until_ended(store, request.app[LIVE_EVENTS], response_id)
    record = await responses.visible_response(store, response_id, tenant=request[PRINCIPAL].tenant)
    return raw_json_response(record.snapshot, headers=headers)


async def _serve_created(
    request: web.Request,
    store: Store,
    admission: Admission,
    create: CreateResponseRequest,
    key: idempotency.IdempotencyKey | None,
) -> web.StreamResponse:
    run = admission.run
    assert run is not None
    if create.is_streaming:
        return await stream_response(request, run.response_id, -1, known=admission.first_events)
    if not create.is_background:
        await run.wait_finished()
        if run.failure is not None and not run.emitted_output:
            if key is not None:
                await idempotency.release_after_refusal(store, key, run.response_id)
            raise upstream_refusal(run.failure, run.response_id)
        # What this instance ran is not the outcome: the store is. If the run was taken over (its lease lost) or
        # its end could not be written here, the response is finished elsewhere; follow it there.
        record = await wait_for_end(store, request.app[LIVE_EVENTS], run.response_id, _sync_wait_seconds(request))
        return raw_json_response(record.snapshot)
    # A background create answers with the response as created (`queued`, as OpenAI's do): admission stored it,
    # so there is nothing to read back.
    return raw_json_response(orjson.dumps(orjson.loads(admission.first_events[0].data)["response"]))


def _sync_wait_seconds(request: web.Request) -> float:
    return request.app[SETTINGS].runs.sync_wait_seconds


def _validate_include(request: web.Request) -> None:
    """`include[]=…` (the SDK's encoding) or `include=…`: each value must be one the API knows."""
    for value in request.query.getall("include[]", []) + request.query.getall("include", []):
        if value not in INCLUDABLE:
            raise InvalidRequest(f"Invalid value for 'include': {value!r} is not supported.", param="include")


def resume_cursor(request: web.Request) -> tuple[int, int | None]:
    """Where a GET stream starts: after `starting_after`, else after `Last-Event-ID`, else from the first event;
    with the epoch of that event when the cursor is an SSE `id:` (`<sequence number>.<epoch>`, see
    gateway/sse.py), which tells exactly which event the client has."""
    starting_after = request.query.get("starting_after")
    if starting_after is not None:
        # The cursor rule, not int(): that takes "+5", " 5", "1_0", other scripts' digits and numbers past 64 bits.
        if not is_cursor_part(starting_after):
            raise InvalidRequest(
                "Invalid value for 'starting_after': expected a sequence number (digits, 0 or more).",
                param="starting_after",
            )
        return int(starting_after), None
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    if last_event_id:
        number, dot, epoch = last_event_id.partition(".")
        if not is_cursor_part(number) or (dot and not is_cursor_part(epoch)):
            raise InvalidRequest(
                "Last-Event-ID must be the id of an event of this stream (a sequence number, optionally followed "
                "by '.' and its epoch).",
                param="Last-Event-ID",
            )
        return int(number), int(epoch) if dot else None
    return -1, None


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """GET /v1/responses/{response_id}: the snapshot, or with `stream=true` its events (after `starting_after` or
    `Last-Event-ID`), replayed from the store and then followed live, on any instance."""
    response_id = request.match_info["response_id"]
    stream = query_flag(request, "stream")
    _validate_include(request)
    cursor, cursor_epoch = resume_cursor(request)
    store = request.app[STORE]
    record = await responses.visible_response(store, response_id, tenant=request[PRINCIPAL].tenant)
    if stream:
        return await resume_stream(request, record, cursor, cursor_epoch)
    return raw_json_response(record.snapshot)


async def resume_stream(
    request: web.Request, record: ResponseRecord, cursor: int, cursor_epoch: int | None
) -> web.StreamResponse:
    """A response's event stream after a client's cursor, once the cursor is known to name an event the store
    still has: past the stored tail, or (with its epoch) an event replaced since, it is refused before the stream
    starts. Every event is stored before anyone sees it, so only a store that lost its last writes (a Redis
    failover to a replica that lagged behind) gets here; the client is told, rather than left waiting for numbers
    that would be given to other events, or handed a mix of two histories."""
    param = "starting_after" if request.query.get("starting_after") is not None else "Last-Event-ID"
    if cursor > record.last_sequence_number:
        raise InvalidRequest(
            f"The cursor ({cursor}) is past the last stored event of this response "
            f"({record.last_sequence_number}): the store no longer has events this client saw, or the cursor is "
            "wrong. Read the response again from an earlier event.",
            param=param,
            code="cursor_past_last_event",
        )
    if cursor_epoch is not None:
        await check_resume_point(request.app[STORE], record.response_id, cursor, cursor_epoch)
    return await stream_response(request, record.response_id, cursor, after_epoch=cursor_epoch)


async def cancel_response(request: web.Request) -> web.Response:
    """POST /v1/responses/{response_id}/cancel, from any instance."""
    record = await request.app[RUN_MANAGER].cancel(request.match_info["response_id"], tenant=request[PRINCIPAL].tenant)
    return raw_json_response(record.snapshot)


async def delete_response(request: web.Request) -> web.Response:
    """DELETE /v1/responses/{response_id}: every key of it gone; refused while it runs."""
    response_id = request.match_info["response_id"]
    # Another tenant's (or a missing) response is a 404 before anything happens to it.
    await responses.visible_response(request.app[STORE], response_id, tenant=request[PRINCIPAL].tenant)
    # An ended response whose follow-ups are not done yet (its turn, its index entry) gets them first: deleting it
    # before would leave its conversation locked by a response that no longer exists.
    await request.app[RUN_MANAGER].lifecycle.settle(response_id)
    await responses.delete_response(request.app[STORE], response_id, tenant=request[PRINCIPAL].tenant)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """GET /v1/responses/{response_id}/input_items: a cursor page of the input items, newest first by default."""
    response_id = request.match_info["response_id"]
    _validate_include(request)
    query = PageQuery.from_query(request.query)
    items = await responses.input_items(request.app[STORE], response_id, tenant=request[PRINCIPAL].tenant)
    return json_response(query.page(items))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses", responses_socket)  # WebSocket mode
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
