"""Live events for local subscribers, fanned out to bounded per-subscriber buffers: handed over directly by the
runs of this process once stored, and read with one feed read per process for responses written elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runs.metrics import RunMetrics
from storage.base import EventFeed, StoredEvent

log = logging.getLogger(__name__)

# After a failed feed read (store unreachable), wait this long, doubling up to the cap, before trying again.
RETRY_DELAY_SECONDS = 0.1
RETRY_DELAY_CAP_SECONDS = 2.0
# A subscriber's idle timer may fire this much before the wait's end (a loop may run a timer up to its clock's
# resolution early) and still count it as idle, rather than be set again for what is left.
IDLE_TIMER_SLACK_SECONDS = 0.001


class LiveEventsClosed(Exception):
    """The instance is shutting down: followers end their streams (without a terminal event) so clients reconnect
    elsewhere with their cursor."""


class SubscriberLagged(Exception):
    """A subscriber fell more than its buffer behind; its buffer was dropped and it must read from the store."""


@dataclass(eq=False, slots=True)
class LiveSubscription:
    """One subscriber's buffer of live events. Events are hints: the store stays the truth, so a gap is filled
    from the store by the follower, never guessed."""

    response_id: str
    capacity: int
    buffer: deque[StoredEvent] = field(default_factory=deque)
    lagged: bool = False
    closed: bool = False
    on_lagged: Callable[[], None] | None = None  # told each time the buffer is dropped
    # What `next` waits on while the buffer is empty. A bare future, not `asyncio.wait_for` on an Event: that makes
    # a Task per wait, and at a model's pace every event is a wait.
    _waiter: asyncio.Future[None] | None = None
    # One idle timer per subscription, moved on lazily: when it fires early (events came meanwhile) it is set again
    # for the current wait's end. A timer made and cancelled at each wait cost a timer per event.
    _idle_timer: asyncio.TimerHandle | None = None
    _idle_timer_at: float = 0.0  # when it fires
    _idle_at: float = 0.0  # the loop time at which the current wait is idle
    # Looked up once: on Python 3.11 `get_running_loop()` is a getpid() system call each time.
    _loop: asyncio.AbstractEventLoop | None = None
    _idle_seconds: float = 0.0  # of the current wait
    # Takes events straight to the subscriber's client, in the step that pushes them: how many it took (a prefix,
    # written in one write), 0 if none. Asked only while the subscriber waits with nothing buffered, so it never
    # overtakes an event: the writer then has written everything before them. Saves waking the subscriber's task
    # for each event (see follow_events).
    direct: Callable[[Sequence[StoredEvent]], int] | None = None

    def push_all(self, events: Sequence[StoredEvent]) -> None:
        """`push` each of `events`, in order, those the direct taker takes excepted."""
        waiter = self._waiter
        if self.direct is not None and waiter is not None and not waiter.done() and not self.buffer and not self.lagged:
            try:
                taken = self.direct(events)
            except Exception:  # the subscriber's trouble: it is woken and meets it itself, the pusher never does
                log.exception("direct delivery of %s failed", self.response_id)
                self.direct = None
                taken = 0
            if taken:
                if self._loop is not None:  # always, while a wait is on: set by it
                    self._idle_at = self._loop.time() + self._idle_seconds  # the client has just heard something
                events = events[taken:]
        for event in events:
            self.push(event)

    def push(self, event: StoredEvent) -> None:
        if self.lagged:
            return
        if len(self.buffer) >= self.capacity:
            # Drop the whole buffer rather than grow: memory is released now, and the subscriber reads what it
            # missed from the store at its own pace.
            self.lagged = True
            self.buffer.clear()
            self.wake()
            if self.on_lagged is not None:
                self.on_lagged()
            return
        self.buffer.append(event)
        self.wake()

    def close(self) -> None:
        self.closed = True
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._waiter is None or self._loop is None:
            return  # not waiting: the next wait sets the timer again
        if self._loop.time() + IDLE_TIMER_SLACK_SECONDS >= self._idle_at:
            self.wake()
        else:
            self._set_idle_timer(self._loop)

    def _set_idle_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop_idle_timer()
        self._idle_timer_at = self._idle_at
        self._idle_timer = loop.call_at(self._idle_at, self._idle_check)

    def stop_idle_timer(self) -> None:
        """The subscriber is gone: its timer need not keep it until it fires."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def take_ready(self) -> list[StoredEvent]:
        """Every event buffered right now (after `next` returned one), without waiting."""
        if self.lagged or self.closed:
            return []
        ready = list(self.buffer)
        self.buffer.clear()
        return ready

    async def next(self, idle_seconds: float) -> StoredEvent | None:
        """The next buffered event, or None after `idle_seconds` without one. Raises SubscriberLagged (once)
        when the buffer overflowed since the last call."""
        if not self.buffer and not self.lagged and not self.closed:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            self._idle_seconds = idle_seconds
            self._idle_at = loop.time() + idle_seconds
            if self._idle_timer is None or self._idle_timer_at > self._idle_at:  # none, or set for a longer wait
                self._set_idle_timer(loop)
            try:
                await waiter
            finally:
                self._waiter = None
        if self.closed:
            raise LiveEventsClosed(self.response_id)
        if self.lagged:
            self.lagged = False
            raise SubscriberLagged(self.response_id)
        return self.buffer.popleft() if self.buffer else None


@dataclass(slots=True)
class _Watch:
    cursor: int
    subscribers: set[LiveSubscription] = field(default_factory=set)
    # Whether the feed reads it (when nobody here writes it): from the first `follow`, where a follower has read
    # the store up to. Before that a feed read would only fetch what the follower reads from the store anyway.
    following: bool = False
    # The epoch of the event at the cursor once one was delivered (0: not known, as after `follow`).
    epoch: int = 0

    def deliver(self, events: Sequence[StoredEvent]) -> None:
        """Push the events past the cursor to every subscriber, and move the cursor. An event under a newer epoch
        is new even at a number already delivered: a later owner wrote it in place of events the store lost, and
        its subscribers must see it at once to tell their clients (EventsLost), not at their next idle check."""
        fresh = []
        for event in events:
            if event.sequence_number > self.cursor or event.epoch > self.epoch:
                self.cursor = event.sequence_number
                self.epoch = event.epoch
                fresh.append(event)
        if not fresh:
            return
        for subscription in list(self.subscribers):
            subscription.push_all(fresh)


class LiveEvents:
    """Hands each new event of a watched response to each of its local subscribers without waiting for any of
    them: a slow subscriber never slows the run or the others, and one that falls a whole buffer behind costs no
    memory (it re-reads from the store).

    Events of responses written by this process arrive by `publish`, straight from their event log once stored;
    only the other watched responses (written by another instance, or by nobody right now) are followed with the
    single feed read. A response whose writer here stops without ending it (handed over, lease lost) goes back to
    the feed from where its subscribers are."""

    def __init__(
        self, feed: EventFeed, *, buffer_events: int = 1024, wait_ms: int = 5_000, metrics: RunMetrics | None = None
    ) -> None:
        self._feed = feed
        self._on_lagged = None if metrics is None else functools.partial(metrics.subscriber_dropped, "lagged")
        self._buffer_events = buffer_events
        self._wait_ms = wait_ms
        self._watches: dict[str, _Watch] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._interrupt: asyncio.Task[None] | None = None
        self._interrupt_again = False
        self._writing: Counter[str] = Counter()  # response id -> event logs open for it in this process
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name="live-events")

    async def close(self) -> None:
        """End every follower's stream, then stop reading. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for watch in self._watches.values():
            for subscription in watch.subscribers:
                subscription.close()
        if self._interrupt is not None:
            self._interrupt.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._feed.close()

    @property
    def watched(self) -> int:
        return len(self._watches)

    @property
    def subscriber_count(self) -> int:
        """Subscribers here now (streams, and synchronous requests waiting for their response's end)."""
        return sum(len(watch.subscribers) for watch in self._watches.values())

    def subscribe(self, response_id: str) -> LiveSubscription:
        """Start buffering events of `response_id`: every event this process stores after this call reaches the
        subscription at once; events stored by other instances reach it once `follow` says from where (events the
        subscriber has may arrive too; it skips them). The client's own cursor is not the watch's: only a point a
        follower has actually read the store up to is (see follow), so no cursor a client makes up, however far
        past the end, can hold back another subscriber or the feed's read."""
        subscription = LiveSubscription(
            response_id, self._buffer_events, closed=self._closed, on_lagged=self._on_lagged
        )
        watch = self._watches.get(response_id)
        if watch is None:
            self._watches[response_id] = _Watch(-1, {subscription})
        else:
            watch.subscribers.add(subscription)
        return subscription

    def follow(self, subscription: LiveSubscription, cursor: int, epoch: int | None = None) -> None:
        """The subscriber has read the store up to `cursor` (the event there written under `epoch`, when known):
        from there on, events stored elsewhere are read by the feed too (a no-op once the response is followed)."""
        watch = self._watches.get(subscription.response_id)
        if watch is None or watch.following:
            return
        if cursor > watch.cursor:
            watch.cursor, watch.epoch = cursor, epoch or 0
        watch.following = True
        if subscription.response_id not in self._writing:
            self._follow_in_feed()

    # -- events written here ----------------------------------------------------------------------------

    def begin_writing(self, response_id: str) -> None:
        """An event log for `response_id` is open here: its events come by `publish`."""
        self._writing[response_id] += 1

    def publish(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        """Events of `response_id` just stored by this process, in order."""
        watch = self._watches.get(response_id)
        if watch is not None:
            watch.deliver(events)

    def end_writing(self, response_id: str) -> None:
        """The event log is closed: if the response goes on elsewhere, the feed follows it from here."""
        self._writing[response_id] -= 1
        if self._writing[response_id] <= 0:
            del self._writing[response_id]
            watch = self._watches.get(response_id)
            if watch is not None and watch.following:
                self._follow_in_feed()

    # -- the feed, for events written elsewhere ---------------------------------------------------------

    def _follow_in_feed(self) -> None:
        """A response joins the feed's read: wake the read in progress (one interrupt at a time; changes that
        come while one is on its way are covered by one more)."""
        self._changed.set()
        if self._interrupt is not None and not self._interrupt.done():
            self._interrupt_again = True
            return
        self._interrupt = asyncio.get_running_loop().create_task(self._interrupt_feed())

    async def _interrupt_feed(self) -> None:
        while True:
            self._interrupt_again = False
            try:
                await self._feed.interrupt()
            except Exception as error:
                # Only a latency cost: the new response joins the read when the current one times out.
                log.debug("could not interrupt the live read: %s", error)
            if not self._interrupt_again:
                return

    def unsubscribe(self, subscription: LiveSubscription) -> None:
        subscription.stop_idle_timer()
        watch = self._watches.get(subscription.response_id)
        if watch is None:
            return
        watch.subscribers.discard(subscription)
        if not watch.subscribers:
            # Left in the current read until it returns; dropped from the next one.
            del self._watches[subscription.response_id]

    async def _read_loop(self) -> None:
        delay = RETRY_DELAY_SECONDS
        failures = 0
        while True:
            cursors = {
                response_id: watch.cursor
                for response_id, watch in self._watches.items()
                if watch.following and response_id not in self._writing
            }
            if not cursors:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                found = await self._feed.read(cursors, wait_ms=self._wait_ms)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Subscribers keep their own timeout and re-read the store, so an outage delays, never loses. The
                # feed reconnects on the next read (a read on a dead connection fails within the feed's bound), so
                # the first retry comes soon; later ones back off. One warning per outage, not one per retry.
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "live event read failed (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_CAP_SECONDS)
                continue
            if failures:
                log.info("live event read recovered after %d failed attempt(s)", failures)
                failures = 0
            delay = RETRY_DELAY_SECONDS
            for response_id, events in found.items():
                watch = self._watches.get(response_id)
                if watch is not None and response_id not in self._writing:  # else its log here hands them over
                    watch.deliver(events)
