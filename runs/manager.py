"""The run manager: admits requests as ResponseRuns, owns their tasks, resumes orphans, and hands over at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import orjson

from runs.admission import check_admissible, new_response, upstream_body
from runs.conversations import begin_turn, end_turn, get_conversation
from runs.errors import InvalidRequest, TooManyRequests, Unavailable, response_not_found
from runs.event_log import EventLog
from runs.history import conversation_id_of, history_for
from runs.idempotency import IdempotencyKey, holder_response_id
from runs.ids import new_id
from runs.items import Json
from runs.request import CreateResponseRequest
from runs.run import ResponseRun
from runs.status import TERMINAL, ResponseStatus
from runs.upstream.base import Upstream
from runs.upstream.router import UpstreamRouter
from storage.base import IdempotencyClaim, Lease, ResponseRecord, Store

# How long a cancel request waits for the owning instance to write the terminal event.
CANCEL_WAIT_SECONDS = 10.0
CANCEL_POLL_SECONDS = 0.02

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How runs are owned and how many run here."""

    instance_id: str = field(default_factory=lambda: new_id("gw"))
    max_concurrent: int = 64
    lease_ms: int = 15_000
    renew_seconds: float = 5.0
    sweep_seconds: float = 2.0
    # With a shared store another instance can take a run over; with the embedded one nobody can.
    handover: bool = True


# _claim's answer when another retry took over an abandoned claim first: admit again, and follow that one.
_RETRY_ADMISSION = "\0retry"


@dataclass(frozen=True, slots=True)
class _Finish:
    """What to settle once a run has ended, beyond its own events."""

    idempotency: IdempotencyKey | None
    conversation_id: str | None
    input_items: list[Json]


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who asked: the tenant that will own the response, and the key a pass-through upstream is called with."""

    tenant: str
    api_key: str | None


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of admitting a request: its response, the run if this instance started one, and whether an
    earlier request with the same Idempotency-Key had already created it."""

    response_id: str
    run: ResponseRun | None
    replayed: bool = False


class RunManager:
    """Runs live here, not in HTTP handlers, so a client's disconnect never ends a stored response."""

    def __init__(self, store: Store, router: UpstreamRouter, settings: RunSettings | None = None) -> None:
        self._store = store
        self._router = router
        self.settings = settings or RunSettings()
        self._runs: dict[str, ResponseRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancel_listener: asyncio.Task[None] | None = None
        self._draining = False
        self.capacity_freed = asyncio.Event()  # the sweeper waits on it to start queued runs sooner

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
    def draining(self) -> bool:
        return self._draining

    @property
    def active_count(self) -> int:
        return len(self._runs)

    @property
    def free_capacity(self) -> int:
        return 0 if self._draining else max(self.settings.max_concurrent - len(self._runs), 0)

    def local_runs(self) -> list[ResponseRun]:
        return list(self._runs.values())

    def local_run(self, response_id: str) -> ResponseRun | None:
        """The run for `response_id` if this instance executes it."""
        return self._runs.get(response_id)

    async def admit(
        self,
        request: CreateResponseRequest,
        *,
        tenant: str = "default",
        idempotency: IdempotencyKey | None = None,
        api_key: str | None = None,
        max_tenant_runs: int | None = None,
    ) -> Admission:
        """Validate, store the response with its first events, and start its run (or queue it when this
        instance is full); or, for a request whose Idempotency-Key already started one, name that response
        instead. Nothing is stored on error.

        Admission finishes even if the caller is cancelled half-way (its client left): a response stored without
        a run would stay in progress forever. A connection-owned (`store=false`) run admitted that way is
        released at once."""
        if self._draining:
            raise Unavailable("This gateway instance is shutting down; retry on another.", headers={"Retry-After": "1"})
        if max_tenant_runs is not None and sum(run.tenant == tenant for run in self._runs.values()) >= max_tenant_runs:
            raise TooManyRequests(
                "Too many responses running for this API key; retry when one has finished.",
                headers={"Retry-After": "1"},
            )
        admission = asyncio.ensure_future(self._admit(request, _Caller(tenant, api_key), idempotency))
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

    async def _admit(
        self, request: CreateResponseRequest, caller: _Caller, idempotency: IdempotencyKey | None
    ) -> Admission:
        check_admissible(request)
        upstream = self._router.route(request.model)
        upstream.prepare(upstream_body(request))  # the request's own parameters: a 400 before anything is stored
        queued = self.free_capacity == 0
        if queued and not request.is_background:
            raise TooManyRequests(
                "This gateway instance is running as many responses as it may; retry shortly.",
                headers={"Retry-After": "1"},
            )
        conversation_id = conversation_id_of(request)
        owner = "" if queued else self.settings.instance_id
        record, snapshot = new_response(
            request, conversation_id=conversation_id, owner=owner, lease_ms=self.settings.lease_ms, tenant=caller.tenant
        )
        if idempotency is not None:
            holder = await self._claim(idempotency, record.response_id)
            if holder == _RETRY_ADMISSION:
                return await self._admit(request, caller, idempotency)
            if holder is not None:
                return Admission(holder, run=None, replayed=True)
        # store=false responses never touch conversation state: they only read it as context.
        turn = conversation_id if conversation_id is not None and request.is_stored else None
        created = took_turn = False
        try:
            if turn is not None:  # another tenant's conversation is a 404 before anything happens to it
                await get_conversation(self._store, turn, tenant=caller.tenant, param="conversation")
            # The response exists before it takes the conversation's turn, so a racing instance that finds this
            # response holding the turn never mistakes it for a dead holder. Indexed before it is created: a
            # response stored but never indexed could be orphaned without anyone noticing.
            due_ms = 0 if queued else int(time.time() * 1000) + self.settings.lease_ms
            await self._store.index_run(record.response_id, due_ms)
            lease = await self._store.create_response(record)
            created = True
            if turn is not None:
                await begin_turn(self._store, turn, record.response_id)
                took_turn = True
            # History is read once the turn is ours: the previous turn's items are in by then.
            history = await history_for(self._store, request, tenant=caller.tenant)
            provider_body = upstream.prepare(upstream_body(request, history))
        except BaseException:
            await self._undo_admission(record.response_id, created, turn if took_turn else None, idempotency)
            raise
        if lease is None:
            log.info("%s queued: this instance is at capacity", record.response_id)
            self.capacity_freed.set()  # another instance, or this one later, starts it
            return Admission(record.response_id, run=None)
        finish = _Finish(idempotency, turn, orjson.loads(record.input_items))
        run = self._start(request, upstream, provider_body, snapshot, len(record.events), lease, finish, caller)
        return Admission(run.response_id, run=run)

    async def _undo_admission(
        self, response_id: str, created: bool, turn: str | None, idempotency: IdempotencyKey | None
    ) -> None:
        """A request refused half-way leaves nothing behind: no response, no turn, no claim on its key."""
        with contextlib.suppress(Exception):
            if turn is not None:
                await self._store.clear_conversation_turn(turn, response_id)
            if created:
                await self._store.delete_response(response_id, only_if_finished=False)
            await self._store.unindex_run(response_id)
            if idempotency is not None:
                await self._store.release_idempotency_key(idempotency.scope, idempotency.key, response_id=response_id)

    def _start(
        self,
        request: CreateResponseRequest,
        upstream: Upstream,
        provider_body: Json,
        snapshot: Json,
        next_sequence_number: int,
        lease: Lease,
        finish: _Finish,
        caller: _Caller,
    ) -> ResponseRun:
        event_log = EventLog(
            self._store, snapshot["id"], snapshot, next_sequence_number=next_sequence_number, lease=lease
        )
        run = ResponseRun(
            request=request,
            upstream=upstream,
            upstream_body=provider_body,
            log=event_log,
            tenant=caller.tenant,
            api_key=caller.api_key,
        )
        self._runs[run.response_id] = run
        task = asyncio.create_task(self._execute(run, finish), name=f"run:{run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(run.response_id, done))
        return run

    async def resume(self, record: ResponseRecord, lease: Lease) -> ResponseRun:
        """Run a response this instance has just claimed: a queued one starting, or one whose owner died before
        it emitted any output, restarting (its stream simply goes on from its last event)."""
        request = CreateResponseRequest.model_validate_json(record.request)
        upstream = self._router.route(request.model)
        history = await history_for(self._store, request, tenant=record.tenant)
        provider_body = upstream.prepare(upstream_body(request, history))
        conversation_id = conversation_id_of(request)
        turn = conversation_id if conversation_id is not None and request.is_stored else None
        input_items = orjson.loads(await self._store.get_input_items(record.response_id) or b"[]")
        snapshot = orjson.loads(record.snapshot)
        finish = _Finish(None, turn, input_items)
        # A pass-through upstream cannot get the client's key back after a restart: it was never stored.
        caller = _Caller(record.tenant, None)
        return self._start(
            request, upstream, provider_body, snapshot, record.last_sequence_number + 1, lease, finish, caller
        )

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
        if run.abandoned:
            return  # another instance owns it now and settles it
        await settle(self._store, run.response_id, run.snapshot, finish.conversation_id, finish.input_items)
        if finish.idempotency is not None:
            try:
                # The key must outlive its response, whose retention restarts with each write.
                await self._store.refresh_idempotency_key(
                    finish.idempotency.scope, finish.idempotency.key, ttl_seconds=finish.idempotency.ttl_seconds
                )
            except Exception:
                log.warning("could not refresh the idempotency key of %s", run.response_id)

    def _forget(self, response_id: str, task: asyncio.Task[None]) -> None:
        self._runs.pop(response_id, None)
        self._tasks.discard(task)
        self.capacity_freed.set()

    async def cancel(self, response_id: str, *, tenant: str = "default") -> ResponseRecord:
        """Cancel a background response, wherever it runs, and return it once it has ended.

        Follows OpenAI's rules: cancelling a cancelled response returns it again; a finished one or a synchronous
        one cannot be cancelled (400); an unknown one is 404.
        """
        record = await self._store.get_response(response_id)
        if record is None or not record.stored or record.tenant != tenant:
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

    async def drain(self, grace_seconds: float) -> None:
        """Graceful shutdown: take no new runs, give the running ones `grace_seconds` to finish, then hand the
        rest over (release their leases so another instance claims them at once)."""
        self._draining = True
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            log.info("draining: waiting up to %.0fs for %d runs", grace_seconds, len(self._runs))
            await asyncio.wait(pending, timeout=grace_seconds)
        if not self.settings.handover:
            return  # nobody to hand over to: close() ends what is left
        for run in list(self._runs.values()):
            log.info("handing %s over to another instance", run.response_id)
            run.abandon()
            with contextlib.suppress(Exception):
                await self._store.release_lease(run.response_id, run.lease)
                await self._store.index_run(run.response_id, 0)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop every run; each ends with a terminal event if the store can still take it."""
        self._draining = True
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


async def settle(
    store: Store, response_id: str, snapshot: Json, conversation_id: str | None, input_items: list[Json]
) -> None:
    """Bookkeeping once a response has ended, wherever it ran: its conversation turn, and the run index."""
    try:
        if conversation_id is not None:
            await end_turn(
                store,
                conversation_id,
                response_id,
                status=snapshot["status"],
                input_items=input_items,
                output=snapshot.get("output", []),
            )
        if ResponseStatus(snapshot["status"]) in TERMINAL:
            await store.unindex_run(response_id)
    except Exception:
        log.exception("could not finish the bookkeeping of %s", response_id)
