"""The run manager: this instance's run slots and run tasks. It admits requests, starts queued or orphaned runs the
lifecycle hands it, and hands its runs over at shutdown; every store step goes through `runs.lifecycle`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from runs.admission import check_admissible, check_history, needs_history, new_response, upstream_body
from runs.cancellation import cancel_response
from runs.compaction import CompactionDue, compaction_due
from runs.conversations import get_conversation
from runs.errors import ApiError, Conflict, TooManyRequests, Unavailable
from runs.history import conversation_id_of, history_for
from runs.idempotency import IdempotencyKey, claim_key
from runs.items import Json, normalise_items
from runs.lifecycle import Lifecycle, RunSettings, TakeOver
from runs.request import CreateResponseRequest
from runs.run import ResponseRun
from runs.slots import RunSlots
from runs.steering import pending_input
from runs.tracing import RunTrace, RunTracer, provider_call
from runs.upstream.base import Upstream
from runs.upstream.head_start import HeadStart, SendsFirst
from runs.upstream.router import UpstreamRouter
from storage.base import Lease, NoticeKind, ResponseRecord, SteersTaken, Store, StoredEvent
from storage.keys import shard_of

__all__ = ["Admission", "RunManager", "RunSettings"]

log = logging.getLogger(__name__)

# How long a look at the queue stays fresh enough that a freed slot need not look again at once.
QUEUE_RECHECK_SECONDS = 0.1

# The slot account of runs this instance claimed from the queue or from a dead owner (not admitted here): counted
# against the instance's capacity, not against any API key's limit.
SWEPT = ""


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who asked: the tenant that will own the response, the key a pass-through upstream is called with, and the
    HTTP request's id (for the run's log lines; none for a run resumed by another instance)."""

    tenant: str
    api_key: str | None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of admitting a request: its response, the run if this instance started one, and whether an
    earlier request with the same Idempotency-Key had already created it."""

    response_id: str
    run: ResponseRun | None
    replayed: bool = False
    # The events admission stored, for a run started here: a stream of the new response starts with them
    # without reading them back.
    first_events: Sequence[StoredEvent] = ()


class RunManager:
    """Runs live here, not in HTTP handlers, so a client's disconnect never ends a stored response."""

    def __init__(
        self,
        store: Store,
        router: UpstreamRouter,
        settings: RunSettings | None = None,
        *,
        lifecycle: Lifecycle | None = None,
        tracer: RunTracer | None = None,
    ) -> None:
        self._store = store
        self._tracer = tracer  # None: tracing is off, and no run has a trace
        self._router = router
        self.settings = settings or RunSettings()
        self.lifecycle = lifecycle or Lifecycle(store, self.settings)
        self._slots = RunSlots(self.settings.max_concurrent)
        self._sends = SendsFirst()  # provider calls leave before admissions' work runs
        self._runs: dict[str, ResponseRun] = {}
        self._slot_tenant: dict[str, str] = {}  # response id -> the tenant its run slot counts against
        # Cancel notices for responses not running here (yet), oldest first, kept for a lease period.
        self._early_cancels: dict[str, float] = {}
        # Likewise steering notices, so a run claimed while its steer was announced still stops for it.
        self._early_steers: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._notice_listener: asyncio.Task[None] | None = None
        self._draining = False
        self.capacity_freed = asyncio.Event()  # the sweeper waits on it to start queued runs sooner
        # Whether queued responses may be waiting (this instance queued one, or the sweeper's last look at the
        # queue left some), and when the sweeper last looked. A freed slot wakes the sweeper at once when some may
        # wait, or when nobody has looked for QUEUE_RECHECK_SECONDS (another instance may have queued one): a
        # burst of finished runs costs one queue read, not two round trips each.
        self.queue_waiting = False
        self.queue_checked_at = -QUEUE_RECHECK_SECONDS

    def start(self) -> None:
        """Begin hearing cancel requests and queued responses on any instance."""
        self._notice_listener = asyncio.create_task(self._listen_for_notices(), name="notice-listener")

    async def _listen_for_notices(self) -> None:
        async for notice in self._store.run_notices():
            if notice.kind is NoticeKind.QUEUED:
                # Queued somewhere: a background request admitted here now queues behind it, and a free slot here
                # starts the queue's head now rather than at the next sweep.
                self.queue_waiting = True
                if self.free_capacity > 0:
                    self.capacity_freed.set()
                continue
            response_id = notice.response_id
            run = self._runs.get(response_id)
            if notice.kind is NoticeKind.STEER:
                if run is not None:
                    run.steer()  # stops at its next safe boundary; a run elsewhere hears its own notice
                else:
                    # It may be starting here right now (a queued response claimed, a takeover): _start looks here.
                    self._early_steers[response_id] = asyncio.get_running_loop().time()
                    self._forget_old_cancels()
                continue
            if run is not None:
                log.info("cancelling %s at another instance's request", response_id)
                run.cancel()
            else:
                # It may be starting here right now (claimed, not registered yet): _start looks here.
                self._early_cancels[response_id] = asyncio.get_running_loop().time()
                self._forget_old_cancels()

    def _forget_old_cancels(self) -> None:
        horizon = asyncio.get_running_loop().time() - self.settings.lease_ms / 1000
        for early in (self._early_cancels, self._early_steers):
            while early and next(iter(early.values())) < horizon:
                del early[next(iter(early))]

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
        return 0 if self._draining else self._slots.free

    def local_runs(self) -> list[ResponseRun]:
        return list(self._runs.values())

    def local_run(self, response_id: str) -> ResponseRun | None:
        """The run for `response_id` if this instance executes it."""
        return self._runs.get(response_id)

    # -- admission -----------------------------------------------------------------------------------------

    async def admit(
        self,
        request: CreateResponseRequest,
        *,
        tenant: str = "default",
        idempotency: IdempotencyKey | None = None,
        api_key: str | None = None,
        max_tenant_runs: int | None = None,
        request_id: str | None = None,
    ) -> Admission:
        """Validate, store the response with its first events, and start its run (or queue it when this
        instance is full); or, for a request whose Idempotency-Key already started one, name that response
        instead. Nothing is stored on error.

        Admission finishes even if the caller is cancelled half-way (its client left): a response stored without
        a run would stay in progress forever. A connection-owned (`store=false`) run admitted that way is
        released at once."""
        self._check_open(tenant, max_tenant_runs)
        # The slot is taken here, before any await: concurrent admissions see each other's at once. A background
        # request queues behind responses that may still be waiting, even when a slot is free: the slot is the
        # queue's head's (first come, first served), which the sweeper woken below claims.
        queued = self.free_capacity == 0 or (request.is_background and self.queue_waiting)
        if queued and not request.is_background:
            raise _instance_full()
        # The request's own checks, done before anything is stored or sent: a 400 here changes nothing.
        check_admissible(request)
        upstream = self._router.route(request.model)
        # Without history this is the body sent; with it, the body is made again once the history is read.
        body = upstream_body(request)
        provider_body = upstream.prepare(body)
        compaction = compaction_due(request, body)
        caller = _Caller(tenant, api_key, request_id)
        trace = self._tracer.admitted_run() if self._tracer is not None else None
        # The provider call goes out now, before the response is built and stored, when its body is final and
        # nothing may yet decide against it (a used Idempotency-Key, a conversation's turn, a history to read):
        # the provider's first token is what the client waits for, and admission's work and round trip overlap
        # it. Nothing it sends is emitted before the response is stored (see HeadStart).
        head_start = None
        if not queued and idempotency is None and not needs_history(request) and compaction is None:
            head_start = self._call_ahead(trace, upstream, provider_body, api_key)
        if not queued:
            self._slots.take(tenant)
        admitting = self._admit(
            request, caller, idempotency, upstream, provider_body, head_start, compaction, trace, queued=queued
        )
        if head_start is not None:
            admitting = self._after_head_start(head_start, admitting)
        admission = asyncio.ensure_future(admitting)
        admission.add_done_callback(lambda done: self._after_admission(done, tenant, trace, holds_slot=not queued))
        try:
            return await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(self._after_abandoned_admission)
            raise

    def _after_admission(
        self, admission: asyncio.Future[Admission], tenant: str, trace: RunTrace | None, *, holds_slot: bool
    ) -> None:
        started = not admission.cancelled() and admission.exception() is None and admission.result().run is not None
        if trace is not None and not started:
            trace.not_run(None if admission.cancelled() else admission.exception())
        if holds_slot and not started:
            self._slots.give_back(tenant)  # a started run gives it back when it ends
            self._slot_freed()

    def _after_abandoned_admission(self, admission: asyncio.Future[Admission]) -> None:
        if admission.cancelled() or admission.exception() is not None:
            return  # nothing was started (the exception is retrieved here, so it is not reported as lost)
        run = admission.result().run
        if run is not None and not run.request.is_stored:
            self.release_connection_owned(run)

    def _call_ahead(
        self, trace: RunTrace | None, upstream: Upstream, provider_body: Json, api_key: str | None
    ) -> HeadStart:
        """The provider call made now, read ahead until the run takes it over; admissions wait for it to leave."""
        call = provider_call(trace, upstream, provider_body, upstream.spec.call_key(api_key), self.lifecycle.metrics)
        return HeadStart(call, self._sends)

    @staticmethod
    async def _after_head_start(head_start: HeadStart, admission: Coroutine[Any, Any, Admission]) -> Admission:
        """`admission` run behind a provider call already made: the call is dropped if admission fails."""
        try:
            return await admission
        except (Exception, asyncio.CancelledError):
            await head_start.discard()
            raise
        finally:
            admission.close()  # no-op once it ran; a coroutine never started is not reported as never awaited

    async def _admit(
        self,
        request: CreateResponseRequest,
        caller: _Caller,
        idempotency: IdempotencyKey | None,
        upstream: Upstream,
        provider_body: Json,
        head_start: HeadStart | None,
        compaction: CompactionDue | None,
        trace: RunTrace | None,
        *,
        queued: bool,
    ) -> Admission:
        await self._sends.wait()  # this request's provider call, and those of the requests before it, leave first
        conversation_id = conversation_id_of(request)
        # store=false responses never touch conversation state: they only read it as context.
        turn = conversation_id if conversation_id is not None and request.is_stored else None
        if turn is not None:  # another tenant's conversation is a 404 before anything happens to it
            await get_conversation(self._store, turn, tenant=caller.tenant, param="conversation")
        history: list[Json] | None = None
        takes_steers: tuple[str, int] | None = None
        if turn is None:
            # A previous_response_id chain (or a read-only conversation) does not change: read it before anything
            # is stored, so that a refusal leaves nothing to undo.
            history = await history_for(self._store, request, tenant=caller.tenant, bounds=self.settings.history_bounds)
            if request.previous_response_id is not None:
                request, takes_steers = await self._with_pending_steers(request, idempotency)
            if needs_history(request):  # (without, check_admissible checked the input alone)
                check_history(request, history)
            if history or takes_steers is not None:
                body = upstream_body(request, history)
                provider_body = upstream.prepare(body)
                compaction = compaction_due(request, body)
        owner = "" if queued else self.settings.instance_id
        record, snapshot = new_response(
            request,
            conversation_id=conversation_id,
            owner=owner,
            lease_ms=self.settings.lease_ms,
            tenant=caller.tenant,
            idempotency=(idempotency.scope, idempotency.key) if idempotency is not None else None,
            turn=turn,
            shard=shard_of(takes_steers[0]) if takes_steers is not None else None,
        )
        if takes_steers is not None:
            record = dataclasses.replace(record, takes_steers=takes_steers)
        if idempotency is not None:
            holder = await claim_key(self._store, idempotency, record.response_id)
            if holder is not None:
                self.lifecycle.metrics.idempotent_replays.inc()
                return Admission(holder, run=None, replayed=True)
            await self.lifecycle.faults.reach("admit.key_claimed", record.response_id)
        # Where admit() could not send the provider call yet, it goes out now, in parallel with the store's round
        # trip (unless the response takes a conversation's turn, whose history is read once the turn is ours).
        # Not for a continuation that takes queued steering input: another may take it first, and the input must
        # reach the provider once.
        if head_start is None and not queued and turn is None and compaction is None and takes_steers is None:
            head_start = self._call_ahead(trace, upstream, provider_body, caller.api_key)
        # Undone on any failure from here on, the create included: its reply may have been lost after it ran
        # (undoing what does not exist changes nothing).
        try:
            try:
                lease = await self.lifecycle.admit(record)
            except SteersTaken:
                raise Conflict(
                    f"Another continuation of '{request.previous_response_id}' took the steering input queued for "
                    "it while this request was admitted; retry (it will continue without that input).",
                    param="previous_response_id",
                    code="steering_input_taken",
                ) from None
            if turn is not None:
                # The response exists before it takes the turn, so a racing instance that finds it holding the
                # turn never mistakes it for a dead holder. History is read once the turn is ours: the previous
                # turn's items are in by then.
                await self.lifecycle.take_turn(turn, record.response_id)
                history = await history_for(
                    self._store, request, tenant=caller.tenant, bounds=self.settings.history_bounds
                )
                # Only now: a call the previous turn made is in the conversation once that turn has ended. A refusal
                # here is undone like any failure below.
                check_history(request, history)
                body = upstream_body(request, history)
                provider_body = upstream.prepare(body)
                compaction = compaction_due(request, body)
        except (Exception, asyncio.CancelledError):
            if head_start is not None:
                await head_start.discard()  # before the undo: the provider stops generating at once
            await self.lifecycle.undo_admission(
                record.response_id,
                idempotency=(idempotency.scope, idempotency.key) if idempotency is not None else None,
                conversation_id=turn,
            )
            raise
        if lease is None:  # queued: no head start was made for it
            log.info("%s queued: this instance is at capacity", record.response_id)
            self.queue_waiting = True
            self.capacity_freed.set()  # this instance later, or another now (told below), starts it
            try:
                await self._store.announce_queued(record.response_id)
            except Exception as error:  # only a quick path: every instance's sweep finds it anyway
                log.warning("could not announce queued %s: %s", record.response_id, error)
            return Admission(record.response_id, run=None)
        run = self._start(
            request,
            upstream,
            provider_body,
            snapshot,
            len(record.events),
            lease,
            caller,
            caller.tenant,
            head_start,
            compaction,
            trace,
        )
        return Admission(run.response_id, run=run, first_events=record.events)

    async def _with_pending_steers(
        self, request: CreateResponseRequest, idempotency: IdempotencyKey | None
    ) -> tuple[CreateResponseRequest, tuple[str, int] | None]:
        """A continuation of a response that stopped for the client's tool outputs while steering input was
        queued for it: the input goes first, in submission order, and this response commits it (atomically when
        it can be made in that response's shard: not with an Idempotency-Key, whose shard it must be in)."""
        previous = request.previous_response_id
        assert previous is not None
        if idempotency is not None:
            # Its id must be in its key's shard, so it cannot commit the input in the step that creates it: the
            # input stays pending for a continuation without a key (README, steering).
            return request, None
        steer_input, count = await pending_input(self._store, previous)
        if not count:
            return request, None
        request = request.model_copy(update={"input": steer_input + normalise_items(request.input)})
        return request, (previous, count)

    def _start(
        self,
        request: CreateResponseRequest,
        upstream: Upstream,
        provider_body: Json,
        snapshot: Json,
        next_sequence_number: int,
        lease: Lease,
        caller: _Caller,
        slot_tenant: str,
        head_start: HeadStart | None = None,
        compaction: CompactionDue | None = None,
        trace: RunTrace | None = None,
    ) -> ResponseRun:
        """Start a run in a slot the caller has taken (counted against `slot_tenant`)."""
        event_log = self.lifecycle.open_log(
            snapshot, next_sequence_number=next_sequence_number, lease=lease, tenant=caller.tenant
        )
        run = ResponseRun(
            request=request,
            upstream=upstream,
            upstream_body=provider_body,
            log=event_log,
            tenant=caller.tenant,
            api_key=caller.api_key,
            request_id=caller.request_id,
            faults=self.lifecycle.faults,
            metrics=self.lifecycle.metrics,
            head_start=head_start,
            compaction=compaction,
            trace=trace,
        )
        if trace is not None:
            trace.started(run.response_id, model=request.model, background=request.is_background)
        if self._early_steers.pop(run.response_id, None) is not None:
            run.steer()
        if self._early_cancels.pop(run.response_id, None) is not None:
            run.cancel()
        run.call_upstream_now()
        self._runs[run.response_id] = run
        self._slot_tenant[run.response_id] = slot_tenant
        task = asyncio.create_task(self._execute(run, trace), name=f"run:{run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(run, done))
        return run

    def _check_open(self, tenant: str, max_tenant_runs: int | None) -> None:
        """503 while draining; 429 when the key already runs as many responses as it may."""
        if self._draining:
            raise Unavailable("This gateway instance is shutting down; retry on another.", headers={"Retry-After": "1"})
        if max_tenant_runs is not None and self._slots.by_tenant[tenant] >= max_tenant_runs:
            raise TooManyRequests(
                "Too many responses running for this API key; retry when one has finished.",
                headers={"Retry-After": "1"},
            )

    @contextlib.asynccontextmanager
    async def model_call_outside_a_run(self, tenant: str, max_tenant_runs: int | None) -> AsyncIterator[None]:
        """A slot for a provider call that is not a response's run (compaction's summary, a token count): it
        counts against the instance's and the key's limits like a run, and is refused (429, 503) the same way."""
        self._check_open(tenant, max_tenant_runs)
        if self.free_capacity == 0:
            raise _instance_full()
        self._slots.take(tenant)
        try:
            yield
        finally:
            self.give_back_slot(tenant)

    # -- starting and resuming runs the sweeper claims ----------------------------------------------------

    def tenant_at_limit(self, tenant: str) -> bool:
        """Whether `tenant` runs as many responses here as its keys allow (then its queued ones wait)."""
        limit = self.settings.tenant_run_limits.get(tenant)
        return limit is not None and self._slots.by_tenant[tenant] >= limit

    def try_take_slot(self, tenant: str = SWEPT) -> bool:
        """Take a run slot for a response about to be claimed, if there is one free (and, for a known `tenant`,
        if it is under its limit): checked and taken in one step, so no admission of that tenant slips between."""
        if self.free_capacity == 0 or (tenant != SWEPT and self.tenant_at_limit(tenant)):
            return False
        self._slots.take(tenant)
        return True

    def give_back_slot(self, tenant: str = SWEPT) -> None:
        self._slots.give_back(tenant)
        self._slot_freed()

    def queue_seen(self, *, waiting: bool) -> None:
        """What the sweeper's look at the queue found: whether queued responses may still wait after it."""
        self.queue_waiting = waiting
        self.queue_checked_at = asyncio.get_running_loop().time()

    def _slot_freed(self) -> None:
        if self.queue_waiting or asyncio.get_running_loop().time() - self.queue_checked_at >= QUEUE_RECHECK_SECONDS:
            self.capacity_freed.set()

    async def take_over(self, response_id: str, *, needs_slot: bool, slot_tenant: str = SWEPT) -> bool:
        """Claim `response_id` (queued, or orphaned) and end it or run it, as its stored state says. With
        `needs_slot`, a slot was taken for it by the caller, counted against `slot_tenant` (given back unless a run
        starts). False when it could not be claimed (someone else holds it, or it has ended or gone)."""
        started = False
        try:
            claimed = await self.lifecycle.claim(response_id)
            if claimed is None:
                return False
            record, lease = claimed
            if await self.lifecycle.take_over(record, lease) == TakeOver.RESUME:
                started = await self._resume(record, lease, slot_tenant)
            return True
        finally:
            if needs_slot and not started:
                self.give_back_slot(slot_tenant)

    async def _resume(self, record: ResponseRecord, lease: Lease, slot_tenant: str = SWEPT) -> bool:
        """Run a response this instance has just claimed: a queued one starting, or one whose owner died before
        it emitted any output, restarting (its stream simply goes on from its last event). One that can no longer
        run ends `failed`. True when a run started."""
        try:
            request = CreateResponseRequest.model_validate_json(record.request)
            upstream = self._router.route(request.model)
            conversation_id = conversation_id_of(request)
            turn = conversation_id if conversation_id is not None and request.is_stored else None
            if turn is not None:
                await self.lifecycle.take_turn(turn, record.response_id)
            history = await history_for(self._store, request, tenant=record.tenant, bounds=self.settings.history_bounds)
            check_history(request, history)
            body = upstream_body(request, history)
            provider_body = upstream.prepare(body)
        except (ApiError, ValueError) as error:
            await self.lifecycle.fail_unresumable(record, lease, _reason(error))
            return False
        snapshot = orjson.loads(record.snapshot)
        # A pass-through upstream cannot get the client's key back after a restart: it was never stored.
        caller = _Caller(record.tenant, None)
        next_number = record.last_sequence_number + 1
        compaction = compaction_due(request, body)
        # The run counts against the response's tenant, so that its later requests see it too: a queued one's slot
        # was taken for its tenant already (checked against its limit in the same step); one taken for whatever
        # the sweep would find (an orphan, restarting) moves to its tenant now.
        if slot_tenant != record.tenant:
            self._slots.give_back(slot_tenant)
            self._slots.take(record.tenant)
        # Not started by the request that admitted it (queued, or taken over): a trace of its own (runs/tracing.py).
        trace = self._tracer.resumed_run() if self._tracer is not None else None
        self._start(
            request,
            upstream,
            provider_body,
            snapshot,
            next_number,
            lease,
            caller,
            record.tenant,
            None,
            compaction,
            trace,
        )
        return True

    # -- the run task --------------------------------------------------------------------------------------

    async def _execute(self, run: ResponseRun, trace: RunTrace | None) -> None:
        try:
            await run.execute()
            if run.abandoned:
                return  # another instance owns it now and finishes it
            await self.lifecycle.finish(run.response_id, run.lease, ended_without_turn=run.ended_without_turn)
        finally:
            if trace is not None:
                trace.ended(run.status.value, failure=run.failure, abandoned=run.abandoned)

    def _forget(self, run: ResponseRun, task: asyncio.Task[None]) -> None:
        self._runs.pop(run.response_id, None)
        self._tasks.discard(task)
        self.give_back_slot(self._slot_tenant.pop(run.response_id))

    # -- cancel --------------------------------------------------------------------------------------------

    async def cancel(self, response_id: str, *, tenant: str = "default") -> ResponseRecord:
        """Cancel a background response wherever it runs (see runs/cancellation.py)."""
        return await cancel_response(self, response_id, tenant=tenant)

    # -- shutdown --------------------------------------------------------------------------------------------

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
            with contextlib.suppress(Exception):
                await self.lifecycle.abandon(run)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop every run; each ends with a terminal event if the store can still take it."""
        self._draining = True
        if self._notice_listener is not None:
            self._notice_listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notice_listener
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


def _instance_full() -> TooManyRequests:
    return TooManyRequests(
        "This gateway instance is running as many responses as it may; retry shortly.", headers={"Retry-After": "1"}
    )


def _reason(error: Exception) -> str:
    return error.message if isinstance(error, ApiError) else str(error)
