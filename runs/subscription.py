"""Following a response's events: replay from the store after a cursor, then live, until the terminal event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from runs.errors import Unavailable, response_not_found
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
    """
    subscription = subscription or live.subscribe(response_id, after)
    cursor = after
    try:
        first = [event for event in known if event.sequence_number > cursor]
        if first:
            yield first
            cursor = first[-1].sequence_number
        read_store = not first
        while True:
            if read_store:
                while True:
                    events = await store.read_events(response_id, cursor, limit=CATCH_UP_PAGE)
                    batch, finished = _until_terminal(events)
                    if batch:
                        yield batch
                        cursor = batch[-1].sequence_number
                    if finished:
                        return
                    if len(events) < CATCH_UP_PAGE:
                        break
                record = await store.get_response(response_id)
                if record is None or (record.status in TERMINAL_STATUSES and record.last_sequence_number <= cursor):
                    return  # gone, or finished with nothing left after the cursor: nothing will ever come live
            read_store = True
            live.follow(subscription, cursor)
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
                    if record.last_sequence_number > cursor:
                        break  # the live feed missed something (e.g. the store was briefly unreachable)
                    if record.status in TERMINAL_STATUSES:
                        return
                    continue
                batch = []
                gap = False
                for event in [live_event, *subscription.take_ready()]:
                    if event.sequence_number <= cursor:
                        continue
                    if event.sequence_number > cursor + 1:
                        gap = True  # read it back from the store
                        break
                    batch.append(event)
                    cursor = event.sequence_number
                    if event.type in TERMINAL_EVENT_TYPES:
                        break
                if batch:
                    yield batch
                    if batch[-1].type in TERMINAL_EVENT_TYPES:
                        return
                if gap:
                    break
    finally:
        live.unsubscribe(subscription)


def _until_terminal(events: list[StoredEvent]) -> tuple[list[StoredEvent], bool]:
    """The events up to and including a terminal one, and whether there was one."""
    for index, event in enumerate(events):
        if event.type in TERMINAL_EVENT_TYPES:
            return events[: index + 1], True
    return events, False


async def wait_for_end(store: Store, live: LiveEvents, response_id: str, timeout_seconds: float) -> ResponseRecord:
    """The response once its terminal event is stored, wherever it runs (a synchronous caller whose instance lost
    the run follows the store, never re-runs it). Past `timeout_seconds` a 503 that names the response, marked not
    to be retried (a retry would run the model again): the client can fetch the response by its id."""
    record = await store.get_response(response_id)
    if record is not None and record.status not in TERMINAL_STATUSES:
        events = follow_events(store, live, response_id, record.last_sequence_number, idle_seconds=1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds), contextlib.aclosing(events):
                async for _ in events:
                    pass  # until the terminal event
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
