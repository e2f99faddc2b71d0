"""Following a response's events from the store: replay after a cursor, then live, until the terminal event."""

from __future__ import annotations

from collections.abc import AsyncIterator

from runs.status import TERMINAL_EVENT_TYPES
from storage.base import TERMINAL_STATUSES, Store, StoredEvent

# How long one blocking read waits before the follower re-checks that the response still exists.
DEFAULT_WAIT_MS = 5_000


async def follow_events(
    store: Store, response_id: str, after: int, *, wait_ms: int = DEFAULT_WAIT_MS
) -> AsyncIterator[StoredEvent]:
    """Yield stored events with sequence_number > after, then each new one as it is stored, and stop after the
    terminal event. Stops early if the response disappears (deleted or expired) or is already over."""
    cursor = after
    while True:
        events = await store.read_events(response_id, cursor, wait_ms=wait_ms)
        for event in events:
            yield event
            cursor = event.sequence_number
            if event.type in TERMINAL_EVENT_TYPES:
                return
        if events:
            continue
        record = await store.get_response(response_id)
        if record is None:
            return
        if record.status in TERMINAL_STATUSES and record.last_sequence_number <= cursor:
            return
