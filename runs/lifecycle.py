"""The life of a run as one state machine over the *stored* status: admit, queue, start, renew, finish, resume,
cancel, abandon. Each transition is one atomic store step; what follows a transition is decided by what the store
holds afterwards, never by what this process believes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from runs.conversations import busy_error, conversation_not_found, end_turn
from runs.event_log import EventLog, EventPublisher
from runs.faults import FaultPoints
from runs.history import HistoryBounds
from runs.ids import new_id
from runs.items import Json
from runs.metrics import RunMetrics
from runs.run import ResponseRun, emit_terminal
from runs.status import TERMINAL, ResponseStatus
from runs.steering import resolve_after_end
from runs.webhooks import WebhookSender
from storage.base import (
    ConversationMissing,
    Lease,
    LeaseLost,
    LogRewound,
    NewResponse,
    ResponseRecord,
    Store,
    StoreClosed,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

# An undo that cannot reach the store is retried this long (with growing pauses) before it is given up.
UNDO_RETRY_SECONDS = 10.0
UNDO_RETRY_FIRST_DELAY_SECONDS = 0.05

UNANSWERABLE_MESSAGE = (
    "The gateway instance serving this synchronous request stopped before it answered. Its client's connection "
    "ended with it and the client cannot know this response's id, so it was not run again: retry the request."
)
ORPHAN_MESSAGE = (
    "The gateway instance running this response stopped after it had started answering; the partial output is "
    "kept. Retry the request to get a complete answer."
)


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
    # An Idempotency-Key restarts its TTL when its response ends, so it outlives the response.
    idempotency_ttl_seconds: int = 86_400
    # Runs a tenant may have here at once (its keys' `max_concurrent_runs`), for the queued responses the sweeper
    # starts: they have no key with them, and count against their tenant like the ones admitted directly.
    tenant_run_limits: Mapping[str, int] = field(default_factory=dict)
    # How much history (a conversation, a previous_response_id chain) one request may bring in.
    history_bounds: HistoryBounds = field(default_factory=HistoryBounds)


class TakeOver:
    """What to do with a response this instance has just claimed, decided from its stored state."""

    RESUME = "resume"  # no output yet: run it (a queued one starting, or an orphan restarting)
    ENDED = "ended"  # it was ended here (cancelled, failed as an orphan, or discarded): nothing to run


class Lifecycle:
    """Every transition of a run. The store's steps are atomic; between two of them a process may die, and each
    state that leaves is one the sweeper recognises and finishes."""

    def __init__(
        self,
        store: Store,
        settings: RunSettings,
        faults: FaultPoints | None = None,
        *,
        publisher: EventPublisher | None = None,
        webhooks: WebhookSender | None = None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self._store = store
        # Told of the webhook deliveries a response owes when it ends; None: no endpoint configured.
        self.webhooks = webhooks
        self.settings = settings
        self.faults = faults or FaultPoints()
        self.metrics = metrics or RunMetrics()
        # Where the event logs of this process hand their stored events (its subscribers); None: nowhere, they
        # read everything from the store.
        self.publisher = publisher

    def open_log(self, snapshot: Json, *, next_sequence_number: int, lease: Lease, tenant: str) -> EventLog:
        """The event log of a response this instance now holds (for `tenant`: whose webhooks its end owes)."""
        return EventLog(
            self._store,
            snapshot["id"],
            snapshot,
            next_sequence_number=next_sequence_number,
            lease=lease,
            publisher=self.publisher,
            outbox=None if self.webhooks is None else self.webhooks.outbox_for(snapshot, tenant),
            metrics=self.metrics,
        )

    # -- admit -------------------------------------------------------------------------------------------

    async def admit(self, new: NewResponse) -> Lease | None:
        """Store the response with its first events and its place in the run index (owned: the lease returned) or
        at the tail of the queue (None), in one step: it can never exist unindexed."""
        lease = await self._store.create_response(new)
        self.metrics.admitted(len(new.events), queued=lease is None)
        await self.faults.reach("admit.created", new.response_id)
        return lease

    async def take_turn(self, conversation_id: str, response_id: str) -> None:
        """Make `response_id` the conversation's one active response (atomically, across instances; again, for a
        resumed run: a no-op then), or 409 while another response runs in it (404 when the conversation is gone).

        A holder that has ended but whose follow-ups are not done (its instance died in between, or has not got
        there yet) is settled on its behalf first: a completed one's items join the conversation exactly once,
        because releasing and appending is one step only the holder's release can take. A holder whose response no
        longer exists (expired, deleted) is cleared. Admission creates a response before it takes the turn, so a
        holder that exists is never mistaken for a missing one."""
        for _ in range(3):
            try:
                holder = await self._store.begin_conversation_turn(conversation_id, response_id)
            except ConversationMissing:
                raise conversation_not_found(conversation_id, "conversation") from None
            if holder is None:
                await self.faults.reach("admit.turn_taken", response_id)
                return
            record = await self._store.get_response(holder)
            if record is not None and ResponseStatus(record.status) not in TERMINAL:
                raise busy_error(holder)
            if record is None:
                await self._store.clear_conversation_turn(conversation_id, holder)
            else:
                await self.settle(holder)
        raise busy_error(response_id)

    async def undo_admission(
        self, response_id: str, *, idempotency: tuple[str, str] | None, conversation_id: str | None
    ) -> None:
        """A request refused after its response was stored leaves nothing behind: response, index or queue entry,
        idempotency claim and turn go in one step, so it is never half undone. It is retried while the store is
        unreachable; if the store stays unreachable past that, the response stays whole (indexed, holding its key
        and turn) and the sweeper runs it once its lease lapses: a retry with the same Idempotency-Key then gets
        that response, never a second run."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNDO_RETRY_SECONDS
        delay = UNDO_RETRY_FIRST_DELAY_SECONDS
        while True:
            try:
                await self._store.abandon_admission(
                    response_id, idempotency=idempotency, conversation_id=conversation_id
                )
                return
            except StoreUnavailable as error:
                if isinstance(error, StoreClosed) or loop.time() + delay > deadline:
                    log.error("could not undo the admission of %s: %s", response_id, error)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- start, resume -----------------------------------------------------------------------------------

    async def claim(self, response_id: str) -> tuple[ResponseRecord, Lease] | None:
        """Claim a queued response, or one whose owner's lease expired, and read it back under the new epoch (the
        old owner is fenced out from here on). None when someone else holds it or it has ended."""
        claimed = await self._store.claim_response(
            response_id, self.settings.instance_id, lease_ms=self.settings.lease_ms
        )
        if claimed is None:
            return None
        lease, recoveries = claimed
        await self.faults.reach("start.claimed", response_id)
        record = await self._store.get_response(response_id)
        if record is None:
            return None
        if recoveries and record.status != ResponseStatus.QUEUED:
            log.warning("%s lost its owner: taking it over here (recovery %d)", response_id, recoveries)
        return record, lease

    async def take_over(self, record: ResponseRecord, lease: Lease) -> str:
        """Decide, from the stored record, the fate of a response this instance has just claimed: a cancel that was
        requested ends it `cancelled`; a connection-owned (`store=false`) one is discarded (its client left with
        its instance); a synchronous, non-streaming one without an Idempotency-Key ends `failed` (its client lost
        the connection with the instance and never learnt the response's id: a re-run would be billed for nobody,
        and its retry would be a second run); one that had started answering ends `failed` with its partial
        output (re-running the model would bill twice and change the text); anything else is to be run."""
        response_id = record.response_id
        if record.cancel_requested:
            log.info("%s was cancelled while nobody ran it: ending it cancelled", response_id)
            await self.end_claimed(record, lease, ResponseStatus.CANCELLED)
            return TakeOver.ENDED
        if not record.stored:
            log.warning("%s (store=false) lost its instance and its client: discarding it", response_id)
            await self._store.delete_response(response_id, only_if_finished=False)
            return TakeOver.ENDED
        if _nobody_can_receive(record):
            log.warning("%s (synchronous, unkeyed) lost its instance and its client: ending it failed", response_id)
            await self.end_claimed(record, lease, ResponseStatus.FAILED, error=_server_error(UNANSWERABLE_MESSAGE))
            return TakeOver.ENDED
        if orjson.loads(record.snapshot).get("output"):
            log.warning("%s lost its owner after output began: ending it failed", response_id)
            await self.end_claimed(record, lease, ResponseStatus.FAILED, error=_server_error(ORPHAN_MESSAGE))
            return TakeOver.ENDED
        return TakeOver.RESUME

    @staticmethod
    def will_run(record: ResponseRecord) -> bool:
        """Whether take_over would run this response again (and so needs a run slot), rather than end it."""
        return (
            not record.cancel_requested
            and record.stored
            and not _nobody_can_receive(record)
            and not orjson.loads(record.snapshot).get("output")
        )

    async def fail_unresumable(self, record: ResponseRecord, lease: Lease, reason: str) -> None:
        """A claimed response that cannot run any more (its conversation or previous response is gone, its model
        is no longer routed, its stored request no longer valid) ends `failed` with a clear error, once."""
        log.warning("%s cannot be resumed (%s): ending it failed", record.response_id, reason)
        message = f"The response could not be resumed after its gateway instance stopped: {reason}"
        await self.end_claimed(record, lease, ResponseStatus.FAILED, error=_server_error(message))

    async def end_claimed(
        self, record: ResponseRecord, lease: Lease, status: ResponseStatus, *, error: Json | None = None
    ) -> None:
        """Write the single terminal event of a response this instance holds but does not run (the event log is
        the one numbering authority), then its follow-ups."""
        event_log = self.open_log(
            orjson.loads(record.snapshot),
            next_sequence_number=record.last_sequence_number + 1,
            lease=lease,
            tenant=record.tenant,
        )
        try:
            await emit_terminal(event_log, status, error=error)
            try:
                await event_log.flush()
            except LogRewound:
                # A hole in the log: a failover lost events its last owner had stored, and that owner wrote on
                # past them before it died. End it past the hole all the same: the claim's new epoch already
                # tells clients that saw the lost events.
                log.warning("%s: its stored log has a hole (a storage failover); ending it past it", record.response_id)
                event_log.continue_past_loss()
                await event_log.flush()
        finally:
            await event_log.close()
        await self.finish(record.response_id, lease)

    # -- renew, abandon ----------------------------------------------------------------------------------

    async def renew(self, run: ResponseRun) -> None:
        """Extend a local run's lease. The renewal also tells of a cancel requested anywhere (so a run waiting a
        long time for its first token still hears it), and a lost lease stops the run at once."""
        try:
            renewal = await self._store.renew_lease(
                run.response_id, run.lease, lease_ms=self.settings.lease_ms, stored_through=run.stored_through
            )
        except LogRewound as error:
            log.error("%s: %s (a storage failover?); ending it", run.response_id, error)
            if error.renewed is not None:
                run.lease = error.renewed
            run.events_lost()
            return
        except StoreUnavailable:
            run.check_next_append()  # the store failed: it may come back as a replica that lacks the last writes
            raise
        except LeaseLost:
            if run.abandoned:
                return  # handed over (its lease released) while this renewal was on its way: nothing was lost
            log.warning("lease of %s lost; stopping it here", run.response_id)
            run.abandon()
            return
        run.lease = renewal.lease
        if renewal.cancel_requested:
            run.cancel()

    async def abandon(self, run: ResponseRun) -> None:
        """Hand a local run over (graceful shutdown): stop it without writing, and release its lease so that it is
        due at once for another instance."""
        run.abandon()
        await self._store.release_lease(run.response_id, run.lease)

    # -- finish ------------------------------------------------------------------------------------------

    async def finish(self, response_id: str, lease: Lease, *, ended_without_turn: bool = False) -> None:
        """After a run (or an ending written here) stopped: if its terminal event is stored, do the follow-ups;
        if it is not (the store refused or could not take it), release the lease so that the sweeper ends it
        from what is stored. Never settles from memory: `ended_without_turn` (the run saw its terminal event
        acknowledged, and it holds no conversation turn) only spares reading the record back, since settling
        itself checks the stored status in the same step."""
        try:
            if ended_without_turn:
                await self.faults.reach("finish.terminal_stored", response_id)
                self._nudge_webhooks()
                if await self._store.settle_response(
                    response_id, idempotency_ttl_seconds=self.settings.idempotency_ttl_seconds
                ):
                    return
            if await self.settle(response_id):
                return
            log.warning("%s stopped without a stored terminal event; leaving its end to the sweeper", response_id)
            await self._store.release_lease(response_id, lease)
        except StoreUnavailable as error:
            # Its index entry falls due when the lease lapses; whoever sweeps then finishes it.
            log.warning("could not finish %s now (%s); the sweeper will", response_id, error)

    def _nudge_webhooks(self) -> None:
        # The end may owe webhooks: deliver them now, not at the sender's next poll (it would find them then).
        if self.webhooks is not None:
            self.webhooks.nudge()

    async def settle(self, response_id: str) -> bool:
        """The follow-ups of a durably ended response, wherever it ran, driven by the stored record: a completed
        turn's items join its conversation and the turn is released; steering queued for it is resolved (a
        successor queued, or the input kept pending, or failed); then it leaves the run index and its
        idempotency key restarts its TTL. Each step is idempotent, and the index entry goes last, so a process
        that dies half-way leaves the response due for a sweeper to settle again. False when it has not ended."""
        record = await self._store.get_response(response_id)
        if record is not None and ResponseStatus(record.status) not in TERMINAL:
            return False
        await self.faults.reach("finish.terminal_stored", response_id)
        self._nudge_webhooks()
        if record is not None and record.conversation_id is not None:
            inputs: list[Json] = orjson.loads(await self._store.get_input_items(response_id) or b"[]")
            output: list[Json] = orjson.loads(record.snapshot).get("output", [])
            await end_turn(
                self._store,
                record.conversation_id,
                response_id,
                status=record.status,
                input_items=inputs,
                output=output,
            )
            await self.faults.reach("finish.turn_ended", response_id)
        if record is not None:
            # Steering queued for it: a successor commits it (or it is kept pending, or failed), before the
            # response leaves the index, so a death in between leaves it due for whoever sweeps next.
            await resolve_after_end(self._store, record)
            await self.faults.reach("finish.steers_resolved", response_id)
        return await self._store.settle_response(
            response_id, idempotency_ttl_seconds=self.settings.idempotency_ttl_seconds
        )

    # -- cancel ------------------------------------------------------------------------------------------

    async def request_cancel(self, response_id: str) -> str | None:
        """Store the cancel request (every owner reads it on its next append or renewal, and hears the notice at
        once). Returns the status it had, or None when it does not exist."""
        status = await self._store.request_cancel(response_id)
        if status is not None:
            await self.faults.reach("cancel.flagged", response_id)
        return status

    async def cancel_unowned(self, response_id: str) -> bool:
        """End a response nobody runs (queued, or its owner died) `cancelled` right here, never sending it upstream.
        False when it has a live owner (who will hear the request) or has ended."""
        claimed = await self.claim(response_id)
        if claimed is None:
            return False
        record, lease = claimed
        if ResponseStatus(record.status) in TERMINAL:
            return False
        await self.end_claimed(record, lease, ResponseStatus.CANCELLED)
        return True


def _server_error(message: str) -> dict[str, Any]:
    return {"code": "server_error", "message": message}


def _nobody_can_receive(record: ResponseRecord) -> bool:
    """Whether nobody could ever read a re-run of this response: a synchronous, non-streaming request learns its
    response's id only from the final answer, so once its connection is gone only an Idempotency-Key retry (which
    replays the response) can reach it."""
    if record.background or record.keyed:
        return False
    return not orjson.loads(record.request).get("stream")
