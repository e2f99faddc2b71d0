"""A response's event log as its run writes it: numbering, snapshotting, and coalesced persist-before-publish."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from runs.metrics import RunMetrics
from runs.snapshot import LIFECYCLE_EVENT_TYPES, Json, apply_event, stored_json
from storage.base import (
    Lease,
    LeaseLost,
    LogRewound,
    OutboxEntry,
    Store,
    StoreClosed,
    StoredEvent,
    StoreUnavailable,
)
from storage.status import TERMINAL_STATUSES

log = logging.getLogger(__name__)

# A run that outpaces the store waits once this many events are queued, so memory stays bounded.
MAX_PENDING_EVENTS = 2048
# A store that cannot be reached is retried (appends are idempotent) with growing pauses, for this long in all.
WRITE_RETRY_SECONDS = 15.0
WRITE_RETRY_FIRST_DELAY_SECONDS = 0.05
WRITE_RETRY_MAX_DELAY_SECONDS = 2.0
# The stored snapshot is rewritten with an append only at status changes and once the events since the last one
# add up to its own size (at least this much): the bytes written stay proportional to the events' bytes however
# long the output grows, and a reader folds at most about a snapshot's worth. (Item boundaries are not worth a
# rewrite: they cost a script round trip each, and folding an item's events is cheap.)
SNAPSHOT_MIN_BYTES = 32 * 1024


@dataclass(frozen=True, slots=True)
class _Retry:
    """An append that failed to reach the store: when its first attempt began, and the failure."""

    started: float
    error: StoreUnavailable


class EventPublisher(Protocol):
    """Where a log hands its events once they are stored: this process's subscribers, without reading them back.
    While a log is open for a response its subscribers here need no feed from the store."""

    def begin_writing(self, response_id: str) -> None: ...

    def publish(self, response_id: str, events: Sequence[StoredEvent]) -> None: ...

    def end_writing(self, response_id: str) -> None: ...


class EventLog:
    """Numbers events from `next_sequence_number`, keeps the snapshot they produce, and appends them to the store.

    An event is visible to nobody until its append has succeeded; then it is handed to this process's subscribers
    (`publisher`) as it is, and other instances' subscribers read it from the store. One append is in flight at a
    time; events emitted meanwhile queue and go out together in the next one.

    Who appends: the run, after each read from the provider (the common case), begins a delta's append with
    `flush_soon` and reads on; the append's reply publishes it and begins the next batch. `flush` appends in the
    caller's task and waits (appends that carry a snapshot or a check, and callers that need their events
    stored). Otherwise the log's writer task, woken once the emitting step is over, appends what nobody flushed.
    """

    def __init__(
        self,
        store: Store,
        response_id: str,
        snapshot: Json,
        *,
        next_sequence_number: int,
        lease: Lease,
        on_cancel_requested: Callable[[], None] | None = None,
        write_retry_seconds: float | None = None,
        publisher: EventPublisher | None = None,
        outbox: Callable[[str], Sequence[OutboxEntry]] | None = None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self._store = store
        self._begins_appends = store.begins_appends  # else `flush_soon` need not offer the store each batch
        self._metrics = metrics
        # The webhook deliveries the response owes if it ends with a given status (runs/webhooks.py): written by
        # the append of its terminal event, in the same step. Made once: a retried append must be the same.
        self._outbox = outbox
        self._owed: Sequence[OutboxEntry] | None = None
        self.lease = lease
        # Called when the store refuses a write because this instance no longer owns the response.
        self.on_lease_lost: Callable[[], None] | None = None
        # Called when the store reports that a cancel was requested (e.g. the pub/sub notice was missed).
        self.on_cancel_requested = on_cancel_requested
        # Called when an append nobody was waiting for failed for good (one `flush_soon` began, or the writer's),
        # other than for a lost lease: its caller reads on meanwhile, and would learn of it only at its next emit.
        self.on_write_failed: Callable[[Exception], None] | None = None
        self._write_retry_seconds = WRITE_RETRY_SECONDS if write_retry_seconds is None else write_retry_seconds
        self._response_id = response_id
        self._snapshot = snapshot
        self._next_sequence_number = next_sequence_number
        self._pending: list[StoredEvent] = []
        self._loop = asyncio.get_running_loop()
        # What the writer waits on while there is nothing for it to do, and whether it is about to be woken.
        self._wakeup: asyncio.Future[None] | None = None
        self._nudged = False
        # Whether an append is in flight (by the writer, a flushing caller, or begun by `flush_soon`): appends
        # never overlap.
        self._appending = False
        # A batch whose append a cancelled caller left unfinished, or whose append begun by `flush_soon` failed to
        # reach the store (it may or may not be stored): appended again exactly as it was before anything else,
        # since appends are idempotent and a merged one would not be. With the failure and when its first attempt
        # began, it is retried within that attempt's window.
        self._interrupted: tuple[list[StoredEvent], bytes | None, str, _Retry | None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._failure: BaseException | None = None
        # Whether the next append must carry the snapshot, and the bytes of events since the last one that did.
        self._snapshot_due = False
        self._bytes_since_snapshot = 0
        self._last_snapshot_bytes = 0
        self._publisher = publisher
        # The last event the store has acknowledged (the lease keeper checks that the store still has it).
        self.stored_through = next_sequence_number - 1
        # After the store lost acknowledged events (LogRewound): what was emitted and never stored, and whether the
        # log now appends past the hole (see continue_past_loss).
        self._unstored: list[StoredEvent] = []
        self._after_loss = False
        # Whether the next append checks that the log still holds what it stored: after the store failed, it may
        # have come back as a replica that lacks the last writes, and plain appends would not notice.
        self._check_next = False
        self._closed = False
        if publisher is not None:
            publisher.begin_writing(response_id)
        # Started on first need: a run that flushes what it emits (the common case) never needs it.
        self._writer: asyncio.Task[None] | None = None

    @property
    def snapshot(self) -> Json:
        """The Response as of the last emitted event (written or about to be)."""
        return self._snapshot

    @property
    def next_sequence_number(self) -> int:
        return self._next_sequence_number

    @property
    def terminal_stored(self) -> bool:
        """Whether this log's last event is a terminal one and the store acknowledged it."""
        return (
            self._failure is None
            and self._drained.is_set()
            and not self._pending
            and self._snapshot.get("status") in TERMINAL_STATUSES
        )

    async def emit(self, event: dict[str, Any], *, flush_follows: bool = False) -> None:
        """Number `event`, apply it to the snapshot and queue its append, once the log has room. Raises the store's
        error once a write has failed: the log cannot go on with a gap. `flush_follows`: the caller flushes (or
        closes the log) before it next waits for anything else, so the writer need not be woken (a loop callback
        per event at light load, where every read from the provider is one event)."""
        while not self.try_emit(event, flush_follows=flush_follows):
            self._nudge_writer()  # a caller that would flush after its batch cannot while it waits here
            await self._drained.wait()

    def try_emit(self, event: dict[str, Any], *, flush_follows: bool = False) -> bool:
        """`emit` without waiting: False (nothing done) when the log has no room, and the caller must `await
        emit`. At a model's pace every event is emitted this way, without a coroutine of its own."""
        if self._failure is not None:
            raise self._failure
        if len(self._pending) >= MAX_PENDING_EVENTS:
            return False
        self._emit_now(event, flush_follows)
        return True

    def _emit_now(self, event: dict[str, Any], flush_follows: bool) -> None:
        # Apply first: an event the snapshot cannot take raises here, before it has used up a sequence number.
        self._snapshot = apply_event(self._snapshot, event)
        event["sequence_number"] = self._next_sequence_number
        # One shared string per event type, not one per event (the upstream's parse makes a new one each time).
        kind = sys.intern(event["type"])
        data = stored_json(event)
        stored = StoredEvent(self._next_sequence_number, kind, data, self.lease.epoch)
        self._next_sequence_number += 1
        if kind in LIFECYCLE_EVENT_TYPES:
            self._snapshot_due = True
        self._bytes_since_snapshot += len(data)
        self._pending.append(stored)
        self._drained.clear()
        if not self._nudged and not flush_follows:
            # After this step, not now: a caller that flushes right away appends the events itself.
            self._nudged = True
            self._loop.call_soon(self._nudge_writer)

    @property
    def _unwritten(self) -> bool:
        """Whether anything emitted still waits for an append: pending events, or an interrupted batch."""
        return bool(self._pending) or self._interrupted is not None

    def _nudge_writer(self) -> None:
        self._nudged = False
        if not self._unwritten or self._appending or self._failure is not None or self._closed:
            return
        if self._writer is None or self._writer.done():  # done: it stopped at a failure the log has since left
            self._writer = self._loop.create_task(self._write_loop(), name=f"event-log:{self._response_id}")
        elif self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def flush(self) -> None:
        """Wait until every emitted event is stored (appending them in this task when no append is in flight);
        raise the store's error if one could not be."""
        if self._unwritten and not self._appending and self._failure is None:
            await self._append_pending()
        if not self._drained.is_set():
            await self._drained.wait()
        if self._failure is not None:
            raise self._failure

    def flush_soon(self) -> bool:
        """Begin appending what is pending without waiting for it, where the store can (a snapshotless append):
        True when that is under way or nothing waits, and the caller may read on, its events published once
        stored; False when the caller must `await flush()` instead (a snapshot or a check is due, the store has no
        such path, a write failed). Events emitted meanwhile go in the next append, begun when this one ends."""
        if self._appending:
            return self._failure is None  # the append in flight takes what is pending next
        if self._failure is not None or self._closed or self._interrupted is not None:
            return False
        if not self._pending:
            return True
        if not self._begins_appends or self._check_next or self._after_loss or self._snapshot_is_due():
            return False
        batch = self._pending
        status = self._snapshot["status"]
        done = functools.partial(self._appended_soon, batch, status, self._loop.time())
        try:
            begun = self._store.start_append(self._response_id, batch, lease=self.lease, done=done)
        except StoreUnavailable:  # (a closed store) the awaited append meets it again, and reports it as it does
            return False
        if begun:
            self._pending = []
            self._appending = True
        return begun

    def _appended_soon(self, batch: list[StoredEvent], status: str, started: float, error: Exception | None) -> None:
        """The end of an append `flush_soon` began: the events are published, and the next batch begun (or left
        to the writer); a store out of reach leaves the batch to the writer's retries, any other error stops the
        log as in `_append_pending`. Runs as a callback: whatever publishing raises, the log goes on (or a waiting
        `flush` would wait for ever)."""
        self._appending = False
        if isinstance(error, StoreUnavailable) and not isinstance(error, StoreClosed):
            self._interrupted = (batch, None, status, _Retry(started, error))  # it may or may not be stored
        elif error is not None:
            self._stop_at(error, batch)
            self._tell_write_failed(error)
            return
        try:
            if error is None:
                self._took(batch, status, cancel_requested=False)
        finally:
            if not self._unwritten:
                self._drained.set()
            elif not self.flush_soon():
                self._nudge_writer()

    def _tell_write_failed(self, error: Exception) -> None:
        if not isinstance(error, LeaseLost) and self.on_write_failed is not None:  # (on_lease_lost was told)
            self.on_write_failed(error)

    async def close(self) -> None:
        """Flush, then stop the writer."""
        try:
            await self.flush()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            if self._publisher is not None:
                self._publisher.end_writing(self._response_id)
                self._publisher = None

    async def _write_loop(self) -> None:
        while self._failure is None:
            if not self._unwritten or self._appending:
                self._wakeup = self._loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            await self._append_pending()
        if isinstance(self._failure, Exception):
            self._tell_write_failed(self._failure)

    async def _append_pending(self) -> None:
        """Append what is pending, batch after batch, until nothing is; on a failure the log stops for good. A
        caller cancelled meanwhile (a run being cancelled) leaves its batch to the writer, as if never taken: an
        append is idempotent, so the one it may have sent is no harm."""
        self._appending = True
        try:
            while self._unwritten:
                retry = None
                if self._interrupted is not None:
                    batch, snapshot, status, retry = self._interrupted
                    self._interrupted = None
                else:
                    # Take the batch and serialise the snapshot in one step (no await between), so the snapshot
                    # written is exactly the one these events produce.
                    batch, self._pending = self._pending, []
                    snapshot = self._snapshot_to_write()
                    status = self._snapshot["status"]
                try:
                    if retry is not None:
                        cancel_requested = await self._append_again(batch, snapshot, status, retry.error, retry.started)
                    else:
                        started = self._loop.time()
                        checked = self._check_next
                        try:
                            cancel_requested = await self._append_call(batch, snapshot, status)
                            if checked:  # (a check asked for while an unchecked append was in flight still holds)
                                self._check_next = False
                        except StoreUnavailable as error:
                            cancel_requested = await self._append_again(batch, snapshot, status, error, started)
                except asyncio.CancelledError:
                    self._interrupted = (batch, snapshot, status, None)
                    self._appending = False
                    self._nudge_writer()
                    raise
                except Exception as error:
                    self._stop_at(error, batch)
                    return
                self._took(batch, status, cancel_requested)
        finally:
            self._appending = False
        self._drained.set()

    def _took(self, batch: list[StoredEvent], status: str, cancel_requested: bool) -> None:
        """The store has `batch`: publish it here."""
        self.stored_through = batch[-1].sequence_number
        if self._metrics is not None:
            self._metrics.stored(len(batch), status)
        if self._publisher is not None:
            self._publisher.publish(self._response_id, batch)
        if cancel_requested and self.on_cancel_requested is not None:
            self.on_cancel_requested()

    def _stop_at(self, error: Exception, batch: list[StoredEvent]) -> None:
        """`batch` could not be stored: the log stops, and whoever waits for it is told (`error`)."""
        self._failure = error
        if isinstance(error, LogRewound):
            self._unstored = [*batch, *self._pending]
        self._pending.clear()
        self._drained.set()
        if isinstance(error, LeaseLost) and self.on_lease_lost is not None:
            self.on_lease_lost()

    def _snapshot_is_due(self) -> bool:
        return self._snapshot_due or self._bytes_since_snapshot >= max(SNAPSHOT_MIN_BYTES, self._last_snapshot_bytes)

    def _snapshot_to_write(self) -> bytes | None:
        """The snapshot to store with the batch being taken, when one is due (see SNAPSHOT_MIN_BYTES)."""
        if not self._snapshot_is_due():
            return None
        snapshot = stored_json(self._snapshot)
        self._snapshot_due = False
        self._bytes_since_snapshot = 0
        self._last_snapshot_bytes = len(snapshot)
        return snapshot

    def check_next_append(self) -> None:
        """The store failed somewhere else (a lease renewal): check the log is whole at the next append."""
        self._check_next = True

    def continue_past_loss(self) -> None:
        """After LogRewound: the store lost events this log had stored, so the log goes on past the hole instead,
        numbered after everything it stored, and no number a client has seen is given to another event. What was
        emitted and never stored is appended again first. For the run's end only: a log with a hole in it is
        ended, not written on."""
        self._after_loss = True
        self._failure = None
        self._pending = [*self._unstored, *self._pending]
        self._unstored = []
        self._snapshot_due = True
        if self._pending:
            self._drained.clear()
            self._nudge_writer()  # the writer may have stopped at the failure: whoever waits for room is served

    def _append_call(self, batch: list[StoredEvent], snapshot: bytes | None, status: str) -> Awaitable[bool]:
        """The store's append of `batch`, for the caller to await: a plain call, not a coroutine of its own, so an
        append costs no frame of the log's beyond `_append_pending`."""
        extra: dict[str, Any] = {}
        if self._outbox is not None and snapshot is not None and status in TERMINAL_STATUSES:
            if self._owed is None:
                self._owed = self._outbox(status)
            if self._owed:
                extra["outbox"] = self._owed
        return self._store.append_events(
            self._response_id,
            batch,
            snapshot=snapshot,
            status=status,
            lease=self.lease,
            checked=self._check_next,
            after_loss=self._after_loss,
            **extra,
        )

    async def _append_again(
        self, batch: list[StoredEvent], snapshot: bytes | None, status: str, error: StoreUnavailable, started: float
    ) -> bool:
        """After the first append of `batch` (begun at loop time `started`) failed with `error`: again, backing off,
        until the write retry window from `started` is used up; then the last error is raised."""
        loop = self._loop
        deadline = started + self._write_retry_seconds
        delay = WRITE_RETRY_FIRST_DELAY_SECONDS
        while True:
            self._check_next = True
            if isinstance(error, StoreClosed) or loop.time() + delay > deadline:
                raise error
            log.warning("append to %s failed (%s); retrying in %.2fs", self._response_id, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_DELAY_SECONDS)
            try:
                cancel_requested = await self._append_call(batch, snapshot, status)
            except StoreUnavailable as again:
                error = again
                continue
            self._check_next = False
            return cancel_requested
