"""WebSocket mode: `GET /v1/responses` upgraded to a WebSocket, speaking the protocol of the openai SDK's
`responses.connect()` (its `responses_client_event` and `responses_server_event` types are the reference).

The socket is only a subscriber. A `response.create` is admitted and run like a POST (stored, numbered,
reattachable over HTTP too); its events are read from the store like any stream's and sent as text frames that
echo the create's `stream_id`. Creates on one lane (`stream_id`) run one after another, lanes side by side. When the
socket goes, `store=true` runs go on; a client resumes them on any instance with the gateway's `response.resume`
event or the `resume` query parameter of the handshake (for the SDK's `on_reconnecting` hook). `store=false`
responses are the connection's own, as at OpenAI: they end with the socket, and a later create on the same socket
continues one from the socket's memory. Steering (`response.steer`) is runs/steering.py's; this module carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from pydantic import ValidationError

from gateway.auth import PRINCIPAL
from gateway.config import WebSocketConfig
from gateway.errors import invalid_body, store_unavailable
from gateway.gc_pacing import create_waiting
from gateway.json_depth import MAX_JSON_DEPTH, nesting_depth
from gateway.socket_counts import SOCKET_COUNTS
from gateway.state import LIVE_EVENTS, ROUTER, RUN_MANAGER, SETTINGS, STORE
from gateway.websocket_frames import (
    CREATE,
    RESUME,
    STEER,
    Resume,
    error_event,
    has_lane,
    parse_cursor,
    parse_resume_query,
    stream_id_of,
    with_lane,
)
from runs import responses, steering
from runs.errors import ApiError, InvalidRequest, TooManyRequests
from runs.ids import new_id
from runs.items import Json, check_input_items, normalise_items
from runs.request import CreateResponseRequest
from runs.run import ResponseRun
from runs.snapshot import has_output
from runs.status import TERMINAL_EVENT_TYPES
from runs.steering import SteerOutcome
from runs.store import StoredEvent, StoreUnavailable
from runs.subscription import follow_events
from runs.upstream.router import UpstreamRouter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Create:
    event: dict[str, Any]


@dataclass(slots=True)
class _UnstoredRun:
    """A store=false response of this socket while it runs. Steering for it stays with the socket (nothing of it
    is stored): the run is told directly, and the socket itself continues it with the input once it ends."""

    run: ResponseRun
    steers: list[Json] = field(default_factory=list)  # {"id", "input"} each, in submission order


@dataclass(slots=True)
class _Lane:
    """One `stream_id`'s work, done in order by one task."""

    stream_id: str | None
    waiting: deque[_Create | Resume] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


def steerable_models(router: UpstreamRouter) -> Callable[[str], bool]:
    """Whether a response of `model` can be steered: not over an upstream called with the client's own key (its
    successor runs after the client's request is gone, and the key was never stored)."""

    def steerable(model: str) -> bool:
        try:
            return not router.route(model).spec.forward_client_key
        except ApiError:
            return True  # no longer routed: its successor fails like any response of an unknown model

    return steerable


def is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def responses_socket(request: web.Request) -> web.StreamResponse:
    """GET /v1/responses: WebSocket mode. Anything but an upgrade is a 405, as the route has no other GET."""
    if not is_websocket_upgrade(request):
        raise ApiError(
            "GET /v1/responses is WebSocket mode: open it with a WebSocket upgrade, or POST to create a response.",
            status=405,
            type="invalid_request_error",
            code="method_not_allowed",
        )
    if "Origin" in request.headers and not request.app[SETTINGS].auth.enabled:
        # Browsers apply no CORS to WebSockets: without auth, any web page could drive the operator's models and
        # read what they answer. API clients (the SDK, Codex) send no Origin.
        raise ApiError(
            "WebSocket connections from a browser page (with an Origin header) need auth enabled on this gateway.",
            status=403,
            type="invalid_request_error",
            code="origin_not_allowed",
        )
    settings = request.app[SETTINGS].websocket
    tenant = request[PRINCIPAL].tenant
    resumes = parse_resume_query(request.query.getall("resume", []))
    counts = request.app[SOCKET_COUNTS]
    if not counts.acquire(tenant, settings.max_sockets_per_key):
        raise TooManyRequests(
            f"Too many WebSocket connections for this API key (at most {settings.max_sockets_per_key}); close one "
            "or retry later.",
            headers={"Retry-After": "1"},
        )
    try:
        socket = web.WebSocketResponse(
            heartbeat=settings.heartbeat_seconds, max_msg_size=settings.max_message_bytes, compress=False
        )
        await socket.prepare(request)
        await ResponsesSocket(request, socket, settings).serve(resumes)
        return socket
    finally:
        counts.release(tenant)


class ResponsesSocket:
    """One client's socket: its lanes, its `store=false` responses, and the frames it is sent."""

    def __init__(self, request: web.Request, socket: web.WebSocketResponse, settings: WebSocketConfig) -> None:
        self._request = request
        self._socket = socket
        self._settings = settings
        app = request.app
        self._manager = app[RUN_MANAGER]
        self._store = app[STORE]
        self._live = app[LIVE_EVENTS]
        self._heartbeat_seconds = app[SETTINGS].sse.heartbeat_seconds
        self._max_pending_steers = app[SETTINGS].steering.max_pending_per_response
        self._principal = request[PRINCIPAL]
        self._steerable = steerable_models(app[ROUTER])
        self._lanes: dict[str | None, _Lane] = {}
        self._stream_ids_seen: set[str] = set()
        self._in_flight = asyncio.Semaphore(settings.max_in_flight_per_socket)
        # store=false responses of this socket, newest last: id -> the items a continuation of it builds on.
        self._unstored: OrderedDict[str, list[Json]] = OrderedDict()
        self._running_unstored: dict[str, _UnstoredRun] = {}
        # Steering input for a store=false response that ended waiting for tool outputs: the socket's continuation
        # of it gets the input first.
        self._pending_unstored: dict[str, list[Json]] = {}
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_heard = loop.time()

    async def serve(self, resumes: Sequence[Resume]) -> None:
        for resume in resumes:
            await self._begin_resume(resume, None)
        idle = asyncio.create_task(self._close_when_idle(), name="websocket-idle")
        try:
            async for message in self._socket:
                self._last_heard = self._loop.time()
                if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
                    await self._receive(message.data)
                else:  # an error (e.g. a frame over max_message_bytes: aiohttp closes with 1009)
                    break
        finally:
            idle.cancel()
            await self._stop()

    async def _stop(self) -> None:
        """The socket is gone: its lanes stop following (store=true runs go on; store=false ones end with it)."""
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_when_idle(self) -> None:
        idle_seconds = self._settings.idle_timeout_seconds
        while True:
            await asyncio.sleep(min(idle_seconds, 5.0))
            if not self._lanes and self._loop.time() - self._last_heard >= idle_seconds:
                await self._socket.close(code=1000, message=b"idle")
                return

    # -- receiving ---------------------------------------------------------------------------------------

    async def _receive(self, data: str | bytes) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            await self._send(error_event(InvalidRequest("The message is not valid JSON.", code="invalid_json")))
            return
        kind = event.get("type") if isinstance(event, dict) else None
        try:
            if nesting_depth(event) > MAX_JSON_DEPTH:
                raise InvalidRequest(
                    f"The message is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json"
                )
            if kind == CREATE:
                self._queue(_Create(event), stream_id_of(event))
            elif kind == STEER:
                await self._steer(event)  # in turn: steers are queued in the order the client sent them
            elif kind == RESUME:
                response_id = event.get("response_id")
                if not isinstance(response_id, str) or not response_id:
                    raise InvalidRequest("Missing required parameter: 'response_id'.", param="response_id")
                after = event.get("starting_after")
                resume = Resume(response_id, -1 if after is None else parse_cursor(after, "starting_after"))
                await self._begin_resume(resume, stream_id_of(event) if "stream_id" in event else None)
            elif isinstance(kind, str):
                raise InvalidRequest(
                    f"Unknown event type '{kind[:64]}': expected {CREATE}, {STEER} or {RESUME}.",
                    param="type",
                    code="unknown_event_type",
                )
            else:
                raise InvalidRequest("Each message must be a JSON object with a string 'type'.", param="type")
        except ApiError as error:
            await self._send(error_event(error, event.get("stream_id") if has_lane(event) else None))
        except StoreUnavailable as error:
            log.warning("websocket: store unavailable: %s", error)
            await self._send(error_event(store_unavailable(), event.get("stream_id") if has_lane(event) else None))

    def _queue(self, work: _Create | Resume, stream_id: str | None) -> None:
        lane = self._lanes.get(stream_id)
        if stream_id is not None and stream_id not in self._stream_ids_seen:
            limit = self._settings.max_stream_ids_per_socket
            if len(self._stream_ids_seen) >= limit:
                raise InvalidRequest(
                    f"This WebSocket connection has reached its maximum number of distinct stream IDs ({limit}). "
                    "Reuse an existing stream_id or open a new WebSocket connection.",
                    param="stream_id",
                    code="websocket_stream_limit_reached",
                )
            self._stream_ids_seen.add(stream_id)
        if lane is None:
            lane = self._lanes[stream_id] = _Lane(stream_id)
        elif len(lane.waiting) >= self._settings.max_queued_per_lane:
            raise TooManyRequests(
                f"At most {self._settings.max_queued_per_lane} requests may wait on one lane (stream_id).",
                code="too_many_queued",
            )
        lane.waiting.append(work)
        if lane.task is None:
            lane.task = asyncio.create_task(self._work_lane(lane), name=f"websocket-lane:{stream_id}")

    async def _begin_resume(self, resume: Resume, stream_id: str | None) -> None:
        """Check a resume before it waits its turn (a wrong id or cursor is an error now), and queue it on the
        lane its response was created on unless the client names one."""
        try:
            record = await responses.visible_response(self._store, resume.response_id, tenant=self._principal.tenant)
            if resume.after > record.last_sequence_number:
                raise InvalidRequest(
                    f"The cursor ({resume.after}) is past the last stored event of this response "
                    f"({record.last_sequence_number}).",
                    param="starting_after",
                    code="cursor_past_last_event",
                )
            if stream_id is None:
                stream_id = orjson.loads(record.request).get("stream_id")
            self._queue(resume, stream_id)
        except ApiError as error:
            await self._send(error_event(error, stream_id))

    # -- lanes -------------------------------------------------------------------------------------------

    async def _work_lane(self, lane: _Lane) -> None:
        try:
            while lane.waiting:
                work = lane.waiting.popleft()
                try:
                    async with self._in_flight:
                        await self._do(work, lane)
                except ApiError as error:
                    await self._send(error_event(error, lane.stream_id))
                except StoreUnavailable as error:
                    log.warning("websocket lane %r: store unavailable: %s", lane.stream_id, error)
                    await self._send(error_event(store_unavailable(), lane.stream_id))
                except ConnectionResetError:
                    return  # the socket is gone: its store=true runs go on, and the client resumes them
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("websocket lane %r failed", lane.stream_id)
                    await self._send(error_event(ApiError("The gateway failed to serve this request."), lane.stream_id))
        finally:
            self._lanes.pop(lane.stream_id, None)

    async def _do(self, work: _Create | Resume, lane: _Lane) -> None:
        if isinstance(work, _Create):
            await self._create(work.event, lane.stream_id)
        else:
            await self._follow_chain(work.response_id, work.after, lane.stream_id)

    async def _create(self, event: dict[str, Any], stream_id: str | None) -> None:
        body = {key: value for key, value in event.items() if key != "type"}
        body.pop("stream", None)  # implicit over a socket
        if body.get("background") is True:
            raise InvalidRequest(
                "background is not supported over WebSocket: every stored response outlives its socket anyway "
                "(resume it with response.resume).",
                param="background",
            )
        try:
            create = CreateResponseRequest.model_validate(body)
        except ValidationError as error:
            raise invalid_body(error) from None
        # Stored as streamed: a run taken over by another instance goes on (someone may be following it).
        create = create.model_copy(update={"stream": True})
        create = self._from_unstored(create)
        principal = self._principal
        first_output_written = create_waiting(self._request.app)  # collections held back (gateway/gc_pacing.py)
        try:
            admission = await self._manager.admit(
                create,
                tenant=principal.tenant,
                api_key=principal.api_key,
                max_tenant_runs=principal.max_concurrent_runs,
            )
            run = admission.run
            local = None
            if run is not None and not create.is_stored:
                local = self._running_unstored[admission.response_id] = _UnstoredRun(run)
            try:
                final = await self._follow(
                    admission.response_id,
                    -1,
                    stream_id,
                    known=admission.first_events,
                    first_output_written=first_output_written,
                )
            finally:
                if run is not None and not create.is_stored:
                    self._running_unstored.pop(admission.response_id, None)
                    self._manager.release_connection_owned(run)
        finally:
            first_output_written()
        if final is not None and not create.is_stored:
            self._remember_unstored(create, final)
            if local is not None and local.steers:
                await self._continue_unstored(event, final, local.steers, stream_id)
        if final is not None and create.is_stored:
            await self._after_end(admission.response_id, stream_id)

    async def _continue_unstored(
        self, event: dict[str, Any], final: Json, steers: list[Json], stream_id: str | None
    ) -> None:
        """A store=false response steered on this socket has ended: the socket continues it with the input (the
        create it came from, with the input instead of its own), or keeps the input for the client's continuation
        when it waits for tool outputs, or fails it."""
        response_id = final["id"]
        items = [item for steer in steers for item in steer["input"]]
        required = steering.required_input(final.get("output") or [])
        outcome = None
        if final.get("status") not in ("completed", "incomplete"):
            outcome = "failed:response_not_active"
        elif required:
            outcome = steering.PENDING_OUTCOME
            self._pending_unstored[response_id] = items
        if outcome is not None:
            note = steering.SteerOutcome(response_id, steers, None, outcome, required, 0)
            for frame in steering.notes_for_clients(note):
                await self._send(with_lane(orjson.dumps(frame), stream_id))
            return
        settings = {key: value for key, value in event.items() if key not in ("input", "previous_response_id")}
        await self._create({**settings, "input": items, "previous_response_id": response_id}, stream_id)

    def _from_unstored(self, create: CreateResponseRequest) -> CreateResponseRequest:
        """A continuation of one of this socket's store=false responses carries its history as input (the store
        never had it): nothing else changes, and the new response stands on its own."""
        previous = create.previous_response_id
        if previous is None or previous not in self._unstored:
            return create
        if isinstance(create.input, list):
            check_input_items(create.input)  # before it is read (admission would check it only after)
        self._unstored.move_to_end(previous)
        own = normalise_items(create.input) if create.input is not None else []
        own = self._pending_unstored.pop(previous, []) + own
        return create.model_copy(update={"previous_response_id": None, "input": [*self._unstored[previous], *own]})

    def _remember_unstored(self, create: CreateResponseRequest, final: Json) -> None:
        if final.get("status") not in ("completed", "incomplete"):
            return
        history = normalise_items(create.input) if create.input is not None else []
        self._unstored[final["id"]] = history + list(final.get("output") or [])
        while len(self._unstored) > self._settings.unstored_responses_kept:
            self._unstored.popitem(last=False)

    async def _follow_chain(self, response_id: str, after: int, stream_id: str | None) -> None:
        final = await self._follow(response_id, after, stream_id)
        if final is not None:
            await self._after_end(response_id, stream_id)

    async def _follow(
        self,
        response_id: str,
        after: int,
        stream_id: str | None,
        *,
        known: Sequence[StoredEvent] = (),
        first_output_written: Callable[[], None] | None = None,
    ) -> Json | None:
        """Send the response's events after `after` until its terminal one; return that event's response.
        `first_output_written` is called once the first output event has been sent."""
        subscription = self._live.subscribe(response_id)
        events = follow_events(
            self._store,
            self._live,
            response_id,
            after,
            idle_seconds=self._heartbeat_seconds,
            known=known,
            subscription=subscription,
        )
        final: Json | None = None
        async with contextlib.aclosing(events):
            async for batch in events:
                if batch is None:
                    continue  # the socket's own pings keep it alive
                for stored in batch:
                    await self._send(with_lane(stored.data, stream_id))
                if first_output_written is not None and has_output(batch):
                    first_output_written()
                    first_output_written = None
                last = batch[-1]
                if last.type in TERMINAL_EVENT_TYPES:
                    final = orjson.loads(last.data)["response"]
        return final

    async def _after_end(self, response_id: str, stream_id: str | None) -> None:
        """A response of this lane has ended: steering queued for it goes on here — its successor's events, or
        what became of the steering input (pending, failed)."""
        while True:
            outcome = await steering.outcome_of(self._store, response_id)
            if outcome is None:
                return
            if outcome.successor is not None:
                await self._send_steer_notes(outcome, stream_id)
                final = await self._follow(outcome.successor, -1, stream_id)
                if final is None:
                    return
                response_id = outcome.successor
                continue
            await self._send_steer_notes(outcome, stream_id)
            return

    async def _send_steer_notes(self, outcome: SteerOutcome, stream_id: str | None) -> None:
        for note in steering.notes_for_clients(outcome):
            await self._send(with_lane(orjson.dumps(note), stream_id))

    # -- steering ----------------------------------------------------------------------------------------

    async def _steer(self, event: dict[str, Any]) -> None:
        local = self._running_unstored.get(str(event.get("previous_response_id")))
        if local is not None:
            await self._steer_unstored(event, local)
            return
        note = await steering.steer_from_socket(
            self._store,
            event,
            tenant=self._principal.tenant,
            max_pending=self._max_pending_steers,
            steerable=self._steerable,
        )
        await self._send(with_lane(orjson.dumps(note.event), note.stream_id))

    async def _steer_unstored(self, event: dict[str, Any], local: _UnstoredRun) -> None:
        """Steer one of this socket's running store=false responses: kept here, the run told directly."""
        stream_id = local.run.request.stream_id
        try:
            items = steering.check_steer_event(event)
            if len(local.steers) >= self._max_pending_steers:
                raise steering.SteerRefused("too_many_pending_steers")
        except steering.SteerRefused as refusal:
            await self._send(with_lane(orjson.dumps(steering.refused_note(refusal, event)), stream_id))
            return
        steer_id = new_id("steer")
        local.steers.append({"id": steer_id, "input": items})
        local.run.steer()
        note = steering.accepted_note(steer_id, local.run.response_id, local.run.stored_through)
        await self._send(with_lane(orjson.dumps(note), stream_id))

    # -- sending -----------------------------------------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        if self._socket.closed:
            raise ConnectionResetError("the WebSocket is closed")
        await self._socket.send_frame(frame, WSMsgType.TEXT)
