"""ResponseRun: one response's life, from admission to its single terminal event, owned by the run manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from runs.compaction import CompactedTurn, CompactionDue, compact_turn
from runs.event_log import EventLog
from runs.faults import FaultPoints
from runs.ids import new_id
from runs.metrics import RunMetrics
from runs.request import CreateResponseRequest
from runs.snapshot import LIFECYCLE_EVENT_TYPES, Json, upstream_reported, with_notes
from runs.status import STATUS_EVENT_TYPE, TERMINAL, ResponseStatus, check_transition
from runs.tracing import RunTrace, provider_call
from runs.upstream.base import Upstream, UpstreamFailure
from runs.upstream.head_start import HeadStart
from runs.usage import add_usage, complete_usage
from storage.base import Lease, LeaseLost, LogRewound

log = logging.getLogger(__name__)

EVENTS_LOST_MESSAGE = (
    "The response's most recent events were lost when its storage failed over to a replica that had not received "
    "them. It was ended rather than go on with event numbers that clients had already seen."
)

_UPSTREAM_TERMINAL_STATUS = {
    "response.completed": ResponseStatus.COMPLETED,
    "response.incomplete": ResponseStatus.INCOMPLETE,
    "response.failed": ResponseStatus.FAILED,
}


class ResponseRun:
    """Drives one upstream turn and writes every event through the EventLog.

    The HTTP handler that admitted the request only watches: the run lives in a task of the RunManager, so a
    dropped connection does not end it (except for `store=false` streams, whose handler cancels it on purpose).
    """

    def __init__(
        self,
        *,
        request: CreateResponseRequest,
        upstream: Upstream,
        upstream_body: dict[str, Any],
        log: EventLog,
        tenant: str = "default",
        api_key: str | None = None,
        request_id: str | None = None,
        faults: FaultPoints | None = None,
        metrics: RunMetrics | None = None,
        head_start: HeadStart | None = None,
        compaction: CompactionDue | None = None,
        trace: RunTrace | None = None,
    ) -> None:
        self.request = request
        self.tenant = tenant
        # The client's own key, for a pass-through upstream: in memory only, never stored or logged.
        self._api_key = api_key
        self._request_id = request_id or "-"
        self.response_id: str = log.snapshot["id"]
        self._upstream = upstream
        self._upstream_body = upstream_body
        # The provider call, when admission already sent it (runs/upstream/head_start.py).
        self._head_start = head_start
        # Compaction before the provider call (`context_management`); its item is output 0, the provider's
        # items follow it.
        self._compaction = compaction
        self._compacted: CompactedTurn | None = None
        self._trace = trace  # the run's spans, when tracing is on (runs/tracing.py)
        self._log = log
        log.on_cancel_requested = self.cancel
        log.on_lease_lost = self.abandon
        log.on_write_failed = self._write_failed
        self._abandoned = False
        # An append the consumer did not wait for failed (see _write_failed): what the run ends with.
        self._write_failure: Exception | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._cancel_requested = False
        # Steering input was queued for it: stop at the next safe boundary, ending `incomplete` / `steered`
        # (`_steered` once it stops for that reason). The boundary is where a new output item would begin: at once
        # while the provider has not started its output, else before the next item's `output_item.added`. An item
        # already begun is finished, and a provider that ends instead (its `response.completed`, usage and all)
        # ends the response normally: the steering then follows it.
        self._steer_requested = False
        self._steered = False
        self._open_items = 0
        # The store lost events this run had stored: it stops and ends past them.
        self._events_lost = False
        self._finished = asyncio.Event()
        self.failure: UpstreamFailure | None = None
        self.emitted_output = False
        self._faults = faults or FaultPoints()
        self._metrics = metrics

    @property
    def snapshot(self) -> dict[str, Any]:
        """The Response as of the last emitted event."""
        return self._log.snapshot

    @property
    def status(self) -> ResponseStatus:
        return ResponseStatus(self._log.snapshot["status"])

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def ended_without_turn(self) -> bool:
        """The run's terminal event is stored and it holds no conversation turn: its follow-ups need nothing read
        back (settling is still one store step that checks the stored status)."""
        return self._log.terminal_stored and self.request.conversation is None

    async def wait_finished(self) -> None:
        """Return once the terminal event is stored (or the run gave up on the store)."""
        await self._finished.wait()

    @property
    def lease(self) -> Lease:
        return self._log.lease

    @lease.setter
    def lease(self, lease: Lease) -> None:
        self._log.lease = lease

    @property
    def stored_through(self) -> int:
        """The last of its events the store has acknowledged."""
        return self._log.stored_through

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        """Stop without writing anything more: the response now belongs to another instance (lease lost, or
        handed over at shutdown), which will finish it."""
        self._abandoned = True
        if self._consumer is not None:
            self._consumer.cancel()

    def cancel(self) -> None:
        """Stop the upstream call; the run ends `cancelled` with one terminal event."""
        self._cancel_requested = True
        if self._consumer is not None:
            self._consumer.cancel()

    def steer(self) -> None:
        """Steering input was queued: end at the next safe boundary (at once when no output has begun)."""
        self._steer_requested = True
        if self.status in TERMINAL:
            return  # its end is being written: the steer applies after it
        if not self.emitted_output and self._consumer is not None and not self._consumer.done():
            self._steered = True
            self._consumer.cancel()

    def events_lost(self) -> None:
        """The store no longer has events this run stored (found by the lease keeper): stop the upstream call; the
        run ends `failed`, past the events that were lost."""
        self._events_lost = True
        if self._consumer is not None:
            self._consumer.cancel()

    def _write_failed(self, error: Exception) -> None:
        """An append nobody waited for failed for good while the consumer read on (it begins a delta's append and
        reads the provider meanwhile): stop the provider call now, as if the consumer's own flush had raised,
        rather than when the provider next sends something (a stalled provider would keep the call open)."""
        if isinstance(error, LogRewound):
            self.events_lost()
            return
        if self._write_failure is None:
            self._write_failure = error
        if self._consumer is not None and not self._consumer.done():
            self._consumer.cancel()

    def check_next_append(self) -> None:
        """The store failed (seen by the lease keeper): the run's next append checks the log is whole first."""
        self._log.check_next_append()

    def call_upstream_now(self) -> None:
        """For a run admitted `in_progress`: start the upstream call in this very step, ahead of the run task's
        first turn, since the provider's first token is what its client waits for."""
        if self.status is ResponseStatus.IN_PROGRESS and self._consumer is None and not self._cancel_requested:
            self._consumer = asyncio.create_task(self._consume_upstream(), name=f"upstream:{self.response_id}")

    async def execute(self) -> None:
        """The run task's body. Never raises for upstream or store failures: it ends the response instead."""
        try:
            if self._consumer is None:
                if self.status is ResponseStatus.QUEUED and not self._cancel_requested:
                    await self._advance(ResponseStatus.IN_PROGRESS)
                    # Stored before the upstream call: its append reports a cancel requested while the run was
                    # waiting, so a cancelled queued request is never sent upstream.
                    await self._log.flush()
                self._consumer = asyncio.create_task(self._consume_upstream(), name=f"upstream:{self.response_id}")
            if self._cancel_requested or self._events_lost:
                self._consumer.cancel()
            try:
                await asyncio.wait({self._consumer})
            except asyncio.CancelledError:
                # The manager is shutting down with no instance to hand over to: stop the upstream and end the
                # response rather than leave it open.
                self._consumer.cancel()
                await asyncio.gather(self._consumer, return_exceptions=True)
                if not self._abandoned:
                    await self._fail("server_error", "The gateway shut down before the response finished.")
                raise
            await self._settle(self._consumer)
        except LogRewound as error:  # found by the append of the run's own terminal event
            log.error("run %s: %s; ending it past them", self.response_id, error)
            try:
                await self._end_after_loss()
            except Exception:
                log.exception("run %s: could not end it after the store lost its events", self.response_id)
        except LeaseLost:
            log.warning("run %s: lease lost; stopped without writing", self.response_id)
        except Exception:
            log.exception("run %s could not be finished cleanly", self.response_id)
        finally:
            if self._head_start is not None:  # a run stopped before it read its provider call
                await self._head_start.discard()
            try:
                await self._log.close()
            except LeaseLost:
                log.warning("run %s: another instance owns it now; this one stopped", self.response_id)
            except Exception:
                log.exception("run %s: events could not be stored", self.response_id)
            self._finished.set()

    async def _settle(self, consumer: asyncio.Task[None]) -> None:
        if self._abandoned:
            if not consumer.cancelled():
                consumer.exception()  # seen: the run stopped on purpose, whatever its upstream task ended with
            return
        error = None if consumer.cancelled() else consumer.exception()
        if self._events_lost or isinstance(error, LogRewound):
            log.error("run %s: the store lost events it had stored; ending it past them", self.response_id)
            await self._end_after_loss()
            return
        if self._write_failure is not None:
            # The consumer was stopped for it, or met it itself: the run ends as it would have in its flush.
            error = self._write_failure
        elif consumer.cancelled() and self._steered and not self._cancel_requested:
            await self._end(ResponseStatus.INCOMPLETE, incomplete_details={"reason": "steered"})
            return
        elif consumer.cancelled():
            await self._end(ResponseStatus.CANCELLED)
            return
        if error is None:
            return
        if isinstance(error, UpstreamFailure):
            # The provider's own words in full, here only: the response's error carries the client's version.
            log.warning(
                "run %s (request %s): upstream failed: %s",
                self.response_id,
                self._request_id,
                error.detail or error.message,
            )
            self.failure = error
            await self._fail(error.response_error_code(), error.message)
            return
        log.error("run %s failed", self.response_id, exc_info=error)
        await self._fail("server_error", "The response failed because of an internal error in the gateway.")

    async def _consume_upstream(self) -> None:
        # aclosing: whatever ends this loop (a failure, a cancel) closes the provider's stream at once, so it
        # stops generating (and billing) instead of waiting for garbage collection.
        if self._head_start is not None:
            stream = self._head_start.batches()
        else:
            api_key = self._upstream.spec.call_key(self._api_key)
            if self._compaction is not None:
                await self._compact_first(self._compaction, api_key)
            stream = provider_call(self._trace, self._upstream, self._upstream_body, api_key, self._metrics)
        async with contextlib.aclosing(stream) as batches:
            async for events in batches:
                for event in events:
                    if await self._take_upstream_event(event):
                        return
                # What arrived together is stored together: one append per read, begun here with no hand-over to
                # the log's writer (a task step per event at a model's pace). A delta's append is not waited for:
                # its reply publishes it, and this task reads on meanwhile (one wake-up per event, not two).
                if not self._log.flush_soon():
                    await self._log.flush()
        raise UpstreamFailure("The upstream ended the stream before the response was finished.")

    async def _take_upstream_event(self, event: dict[str, Any]) -> bool:
        """Emit one upstream event; True once the upstream's terminal event has ended the response."""
        kind = event.get("type")
        if kind in _UPSTREAM_TERMINAL_STATUS:
            await self._end_from_upstream(_UPSTREAM_TERMINAL_STATUS[kind], event.get("response") or {})
            return True
        if kind == "error":
            raise UpstreamFailure(str(event.get("message") or "upstream error"), code=event.get("code"))
        if not isinstance(kind, str) or kind in LIFECYCLE_EVENT_TYPES:
            return False  # our own created / in_progress were already emitted with our id
        if kind == "response.output_item.added" and self._steer_requested and self._open_items == 0:
            # A safe boundary: every item so far is whole, and this one is not emitted. What came before is stored
            # first, then the provider call is closed.
            self._steered = True
            await self._end(ResponseStatus.INCOMPLETE, incomplete_details={"reason": "steered"})
            return True
        event = dict(event)
        if self._compacted is not None and isinstance(event.get("output_index"), int):
            event["output_index"] += 1  # after the compaction item
        # _consume_upstream flushes after each read.
        if not self._log.try_emit(event, flush_follows=True):
            await self._log.emit(event, flush_follows=True)
        if kind == "response.output_item.added":
            self._open_items += 1
        elif kind == "response.output_item.done":
            self._open_items -= 1
        if not self.emitted_output and "run.output" in self._faults.hooks:
            await self._log.flush()
            await self._faults.reach("run.output", self.response_id)
        self.emitted_output = True
        return False

    async def _advance(self, status: ResponseStatus) -> None:
        check_transition(self.status, status)
        # A shallow copy: the event is serialised as it is emitted, and its response becomes the log's snapshot.
        response = {**self._log.snapshot, "status": status.value}
        await self._log.emit({"type": STATUS_EVENT_TYPE[status], "response": response})

    async def _compact_first(self, compaction: CompactionDue, api_key: str | None) -> None:
        """Compact the turn's context before the provider call: the compaction item is announced (output 0),
        made, and stored; the provider is then sent the compacted context."""
        placeholder = {"id": new_id("cmp"), "type": "compaction", "encrypted_content": ""}
        where = {"output_index": 0, "item_id": placeholder["id"]}
        await self._log.emit({"type": "response.output_item.added", "output_index": 0, "item": placeholder})
        await self._log.emit({"type": "response.compaction.compacting", **where})
        await self._log.flush()
        # Output has begun: a provider refusal from here on is a failed response, not a refusal to pass on.
        self.emitted_output = True
        await self._faults.reach("run.compacting", self.response_id)
        compacted = await compact_turn(self._upstream, compaction.body, api_key=api_key)
        item = {**compacted.item, "id": placeholder["id"]}  # one identity from added to done, as clients check
        await self._log.emit({"type": "response.output_item.done", "output_index": 0, "item": item})
        await self._log.flush()
        await self._faults.reach("run.compacted", self.response_id)
        self._compacted = CompactedTurn(item, compacted.model_input, compacted.usage)
        self._upstream_body = self._upstream.prepare({**compaction.body, "input": compacted.model_input})

    async def _end_from_upstream(self, status: ResponseStatus, upstream_response: dict[str, Any]) -> None:
        output = upstream_response.get("output")
        usage = upstream_response.get("usage")
        reported = upstream_reported(upstream_response)
        if self._upstream.spec.kind == "chat":
            # The Chat adapter's notes (how usage was counted, what was dropped); a Responses provider's own
            # metadata is its echo of ours, or its own business.
            metadata = self._log.snapshot.get("metadata") or {}
            noted = with_notes(metadata, upstream_response.get("metadata"))
            if noted != metadata:
                reported["metadata"] = noted
        if self._compacted is not None:
            output = [self._compacted.item, *output] if isinstance(output, list) else None
            usage = add_usage(usage, self._compacted.usage)
        await self._end(
            status,
            output=output if isinstance(output, list) else None,
            usage=usage,
            error=upstream_response.get("error"),
            incomplete_details=upstream_response.get("incomplete_details"),
            reported=reported,
        )

    async def _end_after_loss(self) -> None:
        """End past a hole the store's failover left: whatever was emitted goes out numbered after everything
        this run stored, closed by `failed` unless the run had already emitted its own terminal event."""
        with contextlib.suppress(LogRewound):
            await self._log.flush()  # plain appends may not have noticed the hole; whatever they stored stays
        self._log.continue_past_loss()
        if self.status in TERMINAL:
            await self._log.flush()
        else:
            await self._fail("server_error", EVENTS_LOST_MESSAGE)

    async def _fail(self, code: str, message: str) -> None:
        await self._end(ResponseStatus.FAILED, error={"code": code, "message": message})

    async def _end(
        self,
        status: ResponseStatus,
        *,
        output: list[Any] | None = None,
        usage: Any = None,
        error: Any = None,
        incomplete_details: Any = None,
        reported: Json | None = None,
    ) -> None:
        """Emit the single terminal event. The partial output is kept when the upstream gave no final one."""
        if self.status in TERMINAL:
            return
        await emit_terminal(
            self._log,
            status,
            output=output,
            usage=usage,
            error=error,
            incomplete_details=incomplete_details,
            reported=reported,
        )
        await self._log.flush()


async def emit_terminal(
    event_log: EventLog,
    status: ResponseStatus,
    *,
    output: list[Any] | None = None,
    usage: Any = None,
    error: Any = None,
    incomplete_details: Any = None,
    reported: Json | None = None,
) -> None:
    """Emit the response's terminal event: the current snapshot with its final status and outcome, and what the
    upstream `reported` about how it ran. The partial output is kept when no final one is given."""
    check_transition(ResponseStatus(event_log.snapshot["status"]), status)
    response = {**event_log.snapshot, **(reported or {}), "status": status.value}
    if output is not None:
        response["output"] = output
    response["usage"] = complete_usage(usage)
    response["error"] = error
    response["incomplete_details"] = incomplete_details
    if status is ResponseStatus.COMPLETED:
        response["completed_at"] = int(time.time())
    await event_log.emit({"type": STATUS_EVENT_TYPE[status], "response": response})
