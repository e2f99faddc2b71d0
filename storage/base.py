"""The storage contract, in the domain's words: create a response, append its events, read them after a cursor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Statuses after which a response's event log is closed. Kept here (not imported from runs) because storage must not
# depend on runs; runs.status defines the same set and a test checks they agree.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "incomplete"})


class StoreError(Exception):
    """Base of the errors a Store raises for domain reasons (not for connection failures)."""


class ResponseAlreadyExists(StoreError):
    """`create_response` found a response with that id."""


class ResponseMissing(StoreError):
    """The response does not exist (never created, deleted, or expired)."""


class SequenceConflict(StoreError):
    """An append does not continue the log: a duplicate, a gap, or a stale writer."""


class ResponseClosed(StoreError):
    """An append after the response reached a terminal status."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as clients see it: `data` is the exact JSON sent on the wire, including `sequence_number`."""

    sequence_number: int
    type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """A response's current state: the Response JSON snapshot and the facts kept beside it."""

    response_id: str
    snapshot: bytes
    status: str
    last_sequence_number: int
    background: bool
    stored: bool


@dataclass(frozen=True, slots=True)
class NewResponse:
    """What admission writes in one step: the first events, the snapshot they produce, and the input items."""

    response_id: str
    snapshot: bytes
    status: str
    background: bool
    stored: bool
    input_items: bytes
    events: Sequence[StoredEvent]


class Store(Protocol):
    """Persistence of responses and their event logs. Every write sets the retention TTL of what it touches."""

    async def create_response(self, new: NewResponse) -> None:
        """Create the response with its first events (sequence numbers from 0). Raises ResponseAlreadyExists."""

    async def append_events(
        self, response_id: str, events: Sequence[StoredEvent], *, snapshot: bytes, status: str
    ) -> None:
        """Append events continuing the log and replace the snapshot, atomically.

        Raises ResponseMissing, SequenceConflict (the first event's number is not last + 1) or ResponseClosed.
        """

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        """The response's snapshot and state, or None when it does not exist."""

    async def get_input_items(self, response_id: str) -> bytes | None:
        """The response's input items as a JSON array, or None when it does not exist."""

    async def read_events(
        self, response_id: str, after: int, *, limit: int = 512, wait_ms: int = 0
    ) -> list[StoredEvent]:
        """Events with sequence_number > after, oldest first, at most `limit`.

        With wait_ms > 0 and nothing to return yet, wait up to that long for the next append.
        """

    async def delete_response(self, response_id: str) -> bool:
        """Remove every key of the response. True when something was deleted."""

    async def ping(self) -> None:
        """Raise if the backend cannot be reached."""

    async def close(self) -> None:
        """Release connections and background tasks."""
