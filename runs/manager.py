"""The run manager: admits requests as ResponseRuns, owns their tasks, and stops them at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import orjson

from runs.admission import check_admissible, new_response, upstream_body
from runs.conversations import begin_turn, end_turn
from runs.errors import InvalidRequest, response_not_found
from runs.event_log import EventLog
from runs.history import conversation_id_of, history_for
from runs.idempotency import IdempotencyKey, holder_response_id
from runs.items import Json
from runs.request import CreateResponseRequest
from runs.run import ResponseRun
from runs.status import TERMINAL, ResponseStatus
from runs.upstream.router import UpstreamRouter
from storage.base import IdempotencyClaim, ResponseRecord, Store

# How long a cancel request waits for the owning instance to write the terminal event.
CANCEL_WAIT_SECONDS = 10.0
CANCEL_POLL_SECONDS = 0.02

log = logging.getLogger(__name__)


# _claim's answer when another retry took over an abandoned claim first: admit again, and follow that one.
_RETRY_ADMISSION = "\0retry"


@dataclass(frozen=True, slots=True)
class _Finish:
    """What to settle once a run has ended, beyond its own events."""

    idempotency: IdempotencyKey | None
    conversation_id: str | None
    input_items: list[Json]


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of admitting a request: its response, and the run if this call started one (None when an
    earlier request with the same Idempotency-Key did)."""

    response_id: str
    run: ResponseRun | None

    @property
    def replayed(self) -> bool:
        return self.run is None


class RunManager:
    """Runs live here, not in HTTP handlers, so a client's disconnect never ends a stored response."""

    def __init__(self, store: Store, router: UpstreamRouter) -> None:
        self._store = store
        self._router = router
        self._runs: dict[str, ResponseRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancel_listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin hearing cancel requests made on any instance."""
        self._cancel_listener = asyncio.create_task(self._listen_for_cancels(), name="cancel-listener")

    async def _listen_for_cancels(self) -> None:
        async for response_id in self._store.cancel_requests():
            run = self._runs.get(response_id)
            if run is not None:
                log.info("cancelling %s at another instance's request", response_id)
                run.cancel()

    @property
    def store(self) -> Store:
        return self._store

    @property
    def active_count(self) -> int:
        return len(self._runs)

    def local_run(self, response_id: str) -> ResponseRun | None:
        """The run for `response_id` if this instance executes it."""
        return self._runs.get(response_id)

    async def admit(self, request: CreateResponseRequest, *, idempotency: IdempotencyKey | None = None) -> Admission:
        """Validate, store the response with its first events, and start its run; or, for a request whose
        Idempotency-Key already started one, name that response instead. Nothing is stored on error.

        Admission finishes even if the caller is cancelled half-way (its client left): a response stored without
        a run would stay in progress forever. A connection-owned (`store=false`) run admitted that way is
        released at once."""
        admission = asyncio.ensure_future(self._admit(request, idempotency))
        try:
            return await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(self._after_abandoned_admission)
            raise

    def _after_abandoned_admission(self, admission: asyncio.Future[Admission]) -> None:
        if admission.cancelled() or admission.exception() is not None:
            return  # nothing was started (the exception is retrieved here, so it is not reported as lost)
        run = admission.result().run
        if run is not None and not run.request.is_stored:
            self.release_connection_owned(run)

    async def _admit(self, request: CreateResponseRequest, idempotency: IdempotencyKey | None) -> Admission:
        check_admissible(request)
        upstream = self._router.route(request.model)
        history = await history_for(self._store, request)
        provider_body = upstream.prepare(upstream_body(request, history))  # 400 for what it cannot honour
        conversation_id = conversation_id_of(request)
        record, snapshot = new_response(request, conversation_id=conversation_id)
        if idempotency is not None:
            holder = await self._claim(idempotency, record.response_id)
            if holder == _RETRY_ADMISSION:
                return await self._admit(request, idempotency)
            if holder is not None:
                return Admission(holder, run=None)
        # store=false responses never touch conversation state: they only read it as context.
        turn = conversation_id if conversation_id is not None and request.is_stored else None
        try:
            if turn is not None:
                await begin_turn(self._store, turn, record.response_id)
            try:
                await self._store.create_response(record)
            except BaseException:
                if turn is not None:
                    with contextlib.suppress(Exception):
                        await self._store.clear_conversation_turn(turn, record.response_id)
                raise
        except BaseException:
            if idempotency is not None:
                with contextlib.suppress(Exception):
                    await self._store.release_idempotency_key(
                        idempotency.scope, idempotency.key, response_id=record.response_id
                    )
            raise
        event_log = EventLog(self._store, record.response_id, snapshot, next_sequence_number=len(record.events))
        run = ResponseRun(request=request, upstream=upstream, upstream_body=provider_body, log=event_log)
        self._runs[run.response_id] = run
        finish = _Finish(idempotency, turn, orjson.loads(record.input_items))
        task = asyncio.create_task(self._execute(run, finish), name=f"run:{run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(run.response_id, done))
        return Admission(run.response_id, run=run)

    async def _claim(self, idempotency: IdempotencyKey, response_id: str) -> str | None:
        """Claim the key for `response_id`: None when this request may go on and create it; else the response
        to replay (or _RETRY_ADMISSION when another retry took over an abandoned claim first)."""
        existing = await self._store.claim_idempotency_key(
            idempotency.scope,
            idempotency.key,
            fingerprint=idempotency.fingerprint,
            response_id=response_id,
            ttl_seconds=idempotency.ttl_seconds,
        )
        if existing is None:
            return None
        holder = await holder_response_id(self._store, idempotency, existing)
        if holder is not None:
            return holder
        claim = IdempotencyClaim(idempotency.fingerprint, response_id, int(time.time() * 1000))
        taken_over = await self._store.replace_idempotency_claim(
            idempotency.scope,
            idempotency.key,
            expected_response_id=existing.response_id,
            claim=claim,
            ttl_seconds=idempotency.ttl_seconds,
        )
        if not taken_over:
            return _RETRY_ADMISSION
        log.warning("took over an abandoned idempotency claim for %s", existing.response_id)
        return None

    async def _execute(self, run: ResponseRun, finish: _Finish) -> None:
        await run.execute()
        try:
            if finish.conversation_id is not None:
                snapshot = run.snapshot
                await end_turn(
                    self._store,
                    finish.conversation_id,
                    run.response_id,
                    status=snapshot["status"],
                    input_items=finish.input_items,
                    output=snapshot.get("output", []),
                )
            if finish.idempotency is not None:
                # The key must outlive its response, whose retention restarts with each write.
                await self._store.refresh_idempotency_key(
                    finish.idempotency.scope, finish.idempotency.key, ttl_seconds=finish.idempotency.ttl_seconds
                )
        except Exception:
            log.exception("could not finish the bookkeeping of %s", run.response_id)

    def _forget(self, response_id: str, task: asyncio.Task[None]) -> None:
        self._runs.pop(response_id, None)
        self._tasks.discard(task)

    async def cancel(self, response_id: str) -> ResponseRecord:
        """Cancel a background response, wherever it runs, and return it once it has ended.

        Follows OpenAI's rules: cancelling a cancelled response returns it again; a finished one or a synchronous
        one cannot be cancelled (400); an unknown one is 404.
        """
        record = await self._store.get_response(response_id)
        if record is None or not record.stored:
            raise response_not_found(response_id)
        if not record.background:
            raise InvalidRequest("Cannot cancel a synchronous response.", code="response_not_cancellable")
        self._refuse_if_finished(record)
        run = self._runs.get(response_id)
        if run is not None:
            run.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wait_finished(), CANCEL_WAIT_SECONDS)
        elif await self._store.request_cancel(response_id) is None:
            raise response_not_found(response_id)
        return await self._wait_until_finished(response_id)

    @staticmethod
    def _refuse_if_finished(record: ResponseRecord) -> None:
        status = ResponseStatus(record.status)
        if status in TERMINAL and status is not ResponseStatus.CANCELLED:
            raise InvalidRequest(f"Cannot cancel a {status.value} response.", code="response_not_cancellable")

    async def _wait_until_finished(self, response_id: str) -> ResponseRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_SECONDS
        while True:
            record = await self._store.get_response(response_id)
            if record is None:
                raise response_not_found(response_id)
            if ResponseStatus(record.status) in TERMINAL or loop.time() > deadline:
                return record
            await asyncio.sleep(CANCEL_POLL_SECONDS)

    async def close(self) -> None:
        """Stop every run; each ends with a terminal event if the store can still take it."""
        if self._cancel_listener is not None:
            self._cancel_listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cancel_listener
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def release_connection_owned(self, run: ResponseRun) -> None:
        """The connection that owns a `store=false` run is done: stop the run if it is still going, then forget its
        keys once it has ended (they existed only so its one subscriber could read the events)."""
        if not run.finished:
            run.cancel()
        task = asyncio.create_task(self._discard_after_finish(run), name=f"discard:{run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discard_after_finish(self, run: ResponseRun) -> None:
        await run.wait_finished()
        try:
            await self._store.delete_response(run.response_id, only_if_finished=False)
        except Exception:
            log.warning("could not delete unstored response %s; its TTL will", run.response_id)
