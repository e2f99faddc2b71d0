"""Following a response's events: replay from the store after a cursor, then live, until the terminal event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence

from runs.errors import EventsLost, Unavailable, response_not_found
from runs.live import LiveEvents, LiveEventsClosed, LiveSubscription, SubscriberLagged
from runs.status import TERMINAL_EVENT_TYPES
from storage.base import ResponseRecord, Store, StoredEvent
from storage.status import TERMINAL_STATUSES

# Big pages: a replay of a long response is a few round trips, and each page goes to the client in one write.
CATCH_UP_PAGE = 2048
# Names the response an error is about, when the body alone would not let a client find it.
RESPONSE_ID_HEADER = "x-response-id"


async def follow_events(
    store: Store,
    live: LiveEvents,
    response_id: str,
    after: int,
    *,
    idle_seconds: float,
    known: Sequence[StoredEvent] = (),
    subscription: LiveSubscription | None = None,
    after_epoch: int | None = None,
    direct: Callable[[Sequence[StoredEvent]], bool] | None = None,
) -> AsyncGenerator[list[StoredEvent] | None, None]:
    """Yield stored events with sequence_number > after, in order, without gaps or duplicates, in batches (all
    that is at hand at once, so a writer can send them in one write), and stop after the terminal event. Yields
    None after `idle_seconds` without an event (the caller sends a heartbeat). Ends early when the response
    disappears. A follower slower than the live buffer reads the rest from the store.

    The subscription is taken before the first store read, so an event stored after that read is always handed
    over live; anything the live buffer skipped (a gap) is read back from the store.

    `known` are events the caller knows are stored (a new response's first ones, from its admission), and
    `subscription` one it took before anything after them could have been stored: the store is not read until
    the live events show a gap.

    Raises EventsLost when events already yielded (or, with `after_epoch`, the client's event `after`) are no
    longer the stored ones: the store failed over and lost them, and a later owner wrote others under their
    numbers (known by their higher epoch). The follower then cannot go on without mixing two histories.

    `direct` writes events to the follower's client at once, in one write (True), or declines (False): while the
    follower waits for live events, the events that exactly continue it (the next numbers, same epoch, not
    terminal) are offered to it in the step that stored them, and count as yielded when taken. At a model's pace
    that is every delta, and the follower's task is not woken for it. Everything else comes as before.
    """
    subscription = subscription or live.subscribe(response_id)
    cursor = after
    # The epoch of the event at the cursor, once known: which event the follower has, not just its number.
    cursor_epoch = after_epoch

    def take_directly(events: Sequence[StoredEvent]) -> int:
        nonlocal cursor
        count = 0
        for event in events:
            if (
                event.sequence_number != cursor + count + 1
                or event.epoch != cursor_epoch
                or event.type in TERMINAL_EVENT_TYPES
            ):
                break
            count += 1
        if direct is None or not count or not direct(events[:count] if count < len(events) else events):
            return 0
        cursor += count
        return count

    if direct is not None:
        # Offered only while this follower waits in `subscription.next`, i.e. in the live loop below, where
        # `cursor` is the last event yielded.
        subscription.direct = take_directly
    try:
        first = [event for event in known if event.sequence_number > cursor]
        if first:
            yield first
            cursor, cursor_epoch = first[-1].sequence_number, first[-1].epoch
        read_store = not first
        while True:
            if read_store:
                while True:
                    events = await read_after(store, response_id, cursor, cursor_epoch)
                    read_nothing = not events
                    batch, finished = _until_terminal(events)
                    if batch:
                        yield batch
                        cursor, cursor_epoch = batch[-1].sequence_number, batch[-1].epoch
                    if finished:
                        return
                    if len(events) < CATCH_UP_PAGE:
                        break
                record = await store.get_response(response_id)
                _check_tail(record, cursor, cursor_epoch)
                if record is None or (record.status in TERMINAL_STATUSES and record.last_sequence_number <= cursor):
                    return  # gone, or finished with nothing left after the cursor: nothing will ever come live
                if read_nothing and cursor_epoch is not None and record.last_sequence_number > cursor:
                    # Events follow the cursor's number but none followed the cursor's own event: it may be gone
                    # (replaced under an epoch that sorts lower, a clock behind), or they were just appended.
                    await check_resume_point(store, response_id, cursor, cursor_epoch)
                    continue  # there is more to read
            read_store = True
            live.follow(subscription, cursor, cursor_epoch)
            while True:
                try:
                    live_event = await subscription.next(idle_seconds)
                except SubscriberLagged:
                    break
                except LiveEventsClosed:
                    return
                if live_event is None:
                    yield None
                    record = await store.get_response(response_id)
                    if record is None:
                        return
                    _check_tail(record, cursor, cursor_epoch)
                    if record.last_sequence_number > cursor:
                        break  # the live feed missed something (e.g. the store was briefly unreachable)
                    if record.status in TERMINAL_STATUSES:
                        return
                    continue
                batch = []
                gap = False
                for event in [live_event, *subscription.take_ready()]:
                    if event.sequence_number <= cursor:
                        if cursor_epoch is not None and event.epoch > cursor_epoch:
                            raise EventsLost(response_id, cursor)  # written in place of one already yielded
                        continue  # yielded already
                    if event.sequence_number > cursor + 1 or (cursor_epoch is not None and event.epoch != cursor_epoch):
                        # A gap: read it back from the store. A new owner: the store, read after the very event
                        # the follower has, tells whether the new owner began right after it.
                        gap = True
                        break
                    batch.append(event)
                    cursor, cursor_epoch = event.sequence_number, event.epoch
                    if event.type in TERMINAL_EVENT_TYPES:
                        break
                if batch:
                    yield batch
                    if batch[-1].type in TERMINAL_EVENT_TYPES:
                        return
                if gap:
                    break
    finally:
        subscription.direct = None
        live.unsubscribe(subscription)


def _check_tail(record: ResponseRecord | None, cursor: int, cursor_epoch: int | None) -> None:
    """EventsLost when the stored log now ends before the follower's cursor, or at it with another event."""
    if record is None or cursor < 0:
        return
    if record.last_sequence_number < cursor or (
        record.last_sequence_number == cursor and cursor_epoch is not None and record.last_epoch != cursor_epoch
    ):
        raise EventsLost(record.response_id, cursor)


async def read_after(store: Store, response_id: str, after: int, after_epoch: int | None) -> list[StoredEvent]:
    """A page of the stored events after the cursor (`after`, of epoch `after_epoch` when known); EventsLost when
    the event at the cursor has been lost and replaced since."""
    events = await store.read_events(
        response_id, after, limit=CATCH_UP_PAGE, after_epoch=after_epoch if after >= 0 else None
    )
    if events and events[0].sequence_number <= after:
        raise EventsLost(response_id, after)
    return events


async def check_resume_point(store: Store, response_id: str, after: int, after_epoch: int) -> None:
    """Raise EventsLost unless the stored event `after` is the one of epoch `after_epoch` a client says it last
    received (from the `id:` of an event stream: `<sequence number>.<epoch>`), so a reconnect is refused before
    its stream starts rather than cut off once it has."""
    if after < 0:
        return
    for _ in range(2):  # a second look, in case events were appended between the read and the record
        if await read_after(store, response_id, after, after_epoch):
            return
        record = await store.get_response(response_id)
        if record is None or record.last_sequence_number <= after:
            return  # nothing after it yet (or gone): the caller's own checks say what that means
    # Events follow the cursor's number, but none follows that event: no such event is stored.
    raise EventsLost(response_id, after)


def _until_terminal(events: list[StoredEvent]) -> tuple[list[StoredEvent], bool]:
    """The events up to and including a terminal one, and whether there was one."""
    for index, event in enumerate(events):
        if event.type in TERMINAL_EVENT_TYPES:
            return events[: index + 1], True
    return events, False


async def until_ended(store: Store, live: LiveEvents, response_id: str) -> ResponseRecord | None:
    """Return once the response's terminal event is stored, wherever it runs: the record as last read when that
    read already showed the end (or that it is gone), else None (the caller reads it, if it wants it)."""
    while True:
        record = await store.get_response(response_id)
        if record is None or record.status in TERMINAL_STATUSES:
            return record
        events = follow_events(store, live, response_id, record.last_sequence_number, idle_seconds=1.0)
        try:
            async with contextlib.aclosing(events):
                async for _ in events:
                    pass  # until the terminal event
            return None
        except EventsLost:
            continue  # the store failed over under the follower: follow the response as it is stored now


async def wait_for_end(store: Store, live: LiveEvents, response_id: str, timeout_seconds: float) -> ResponseRecord:
    """The response once its terminal event is stored, wherever it runs (a synchronous caller whose instance lost
    the run follows the store, never re-runs it). Past `timeout_seconds` a 503 that names the response, marked not
    to be retried (a retry would run the model again): the client can fetch the response by its id."""
    record = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_seconds):
            record = await until_ended(store, live, response_id)
    if record is None:  # followed to its end (or timed out): read it as it is now
        record = await store.get_response(response_id)
    if record is None:
        raise response_not_found(response_id)
    if record.status not in TERMINAL_STATUSES:
        raise Unavailable(
            f"Response '{response_id}' is still running on another gateway instance; fetch it with "
            f"GET /v1/responses/{response_id}.",
            headers={"x-should-retry": "false", RESPONSE_ID_HEADER: response_id},
        )
    return record
