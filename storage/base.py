"""The storage contract, in the domain's words and split by role: the event log, the run queue and leases,
idempotency keys, conversations. `Store` is all of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


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


class LeaseLost(StoreError):
    """This instance no longer owns the response (its lease expired, or another instance claimed it): every
    write it tries is refused, so it must stop."""


class LogRewound(SequenceConflict):
    """The store holds fewer of the response's events than it acknowledged to their writer: a failover to a replica
    that had not received the last of them (replication is asynchronous). Appending on would leave a hole or give
    numbers clients have seen to other events; the writer ends the response past them instead
    (`append_events(..., after_loss=True)`)."""

    def __init__(self, response_id: str, last_stored: int, *, renewed: Lease | None = None) -> None:
        super().__init__(f"{response_id}: the stored log ends at {last_stored}, before events already stored")
        self.response_id = response_id
        self.last_stored = last_stored
        # From a renewal: the lease was extended all the same, so its owner has the time to end the response.
        self.renewed = renewed


class ConversationMissing(StoreError):
    """The conversation does not exist (never created, deleted, or expired)."""


class CursorNotFound(StoreError):
    """A page's `after` names no item of the list."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or did not answer in time. Safe to retry: appends are idempotent."""


class StoreClosed(StoreUnavailable):
    """The store was closed (this instance is shutting down): retrying will not help."""


@dataclass(slots=True)  # not frozen: a frozen dataclass takes three times as long to build, and millions are
class StoredEvent:
    """One event as clients see it: `data` is the exact JSON sent on the wire, including `sequence_number`.
    `epoch` is the lease epoch of the writer that stored it (part of its place in the Redis stream, which is how a
    fenced-out writer's late appends are refused); it is not part of what clients see. Never changed once made."""

    sequence_number: int
    type: str
    data: bytes
    epoch: int = 1


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """A response's current state: the Response JSON as of its last stored event (the stored snapshot with the
    events after it folded in) and the facts kept beside it."""

    response_id: str
    snapshot: bytes
    status: str
    last_sequence_number: int
    background: bool
    stored: bool
    request: bytes = b"{}"
    owner: str = ""
    lease_until_ms: int = 0
    recovery_count: int = 0
    tenant: str = "default"
    cancel_requested: bool = False
    conversation_id: str | None = None  # the conversation whose turn it holds
    keyed: bool = False  # created under an Idempotency-Key
    last_epoch: int = 1  # the epoch its last stored event was written under (which event that number is)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One webhook delivery owed for a response: `payload` is the sender's business (opaque to the store), kept
    in the outbox of the response's shard until it is delivered or given up."""

    response_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to write a response: who holds it, with which fencing epoch, and until when (Redis time, ms)."""

    owner: str
    epoch: int
    until_ms: int


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
    request: bytes = b"{}"  # the validated create request, so any instance can restart the run
    owner: str = ""  # the instance that runs it; "" queues it for whichever instance has room first
    lease_ms: int = 15_000
    tenant: str = "default"
    idempotency: tuple[str, str] | None = None  # (scope, key) of the Idempotency-Key that created it
    conversation_id: str | None = None  # the conversation whose turn it takes
    # (steered response id, number of its queued steers): this response commits them, in the same step (it is made
    # in that response's shard); refused with SteersTaken when they are no longer all queued.
    takes_steers: tuple[str, int] | None = None


class NoticeKind(Enum):
    CANCEL = "cancel"  # a cancel was requested for the response
    QUEUED = "queued"  # the response was queued: an instance with a free slot should start the queue's head
    STEER = "steer"  # steering input was queued for the response: its run should stop at its next safe boundary


class SteersTaken(StoreError):
    """A response meant to commit a response's queued steering input found it committed (or resolved) already."""


class SteerQueueOutcome(Enum):
    """What `queue_steer` did."""

    QUEUED = "queued"
    MISSING = "missing"
    ENDED = "ended"  # the response has ended: nothing is queued
    FULL = "full"  # as many steers as allowed are queued already


@dataclass(frozen=True, slots=True)
class SteerState:
    """A response's steering: what is queued (stored JSON, in submission order), the successor that committed it,
    or what became of it instead (`pending`: waiting for the client's tool outputs; `failed:<code>`)."""

    queued: Sequence[bytes]
    successor: str | None = None
    outcome: str | None = None


@dataclass(frozen=True, slots=True)
class RunNotice:
    """What one instance tells every other about a response, as it happens. Only a quick path: the store holds
    what it says (the cancel flag, the queue), and a notice may be missed."""

    kind: NoticeKind
    response_id: str


@dataclass(frozen=True, slots=True)
class Renewal:
    """A renewed (or released) lease, and whether a cancel of the response has been requested meanwhile."""

    lease: Lease
    cancel_requested: bool


class DeleteOutcome(Enum):
    """What `delete_response` did."""

    DELETED = "deleted"
    MISSING = "missing"
    ACTIVE = "active"  # refused: the response has not reached a terminal status


class EventFeed(Protocol):
    """One reader of live events for many responses at once, so a process needs one blocking read, not one per
    subscriber."""

    async def read(self, cursors: Mapping[str, int], *, wait_ms: int) -> dict[str, list[StoredEvent]]:
        """Events after each response's cursor; waits up to wait_ms when there are none. May return early (empty)
        after `interrupt`, or when the backend bounds a single wait (to notice a dead connection in time)."""
        ...

    async def interrupt(self) -> None:
        """Make a read in progress return now (the set of responses to watch has changed)."""

    async def close(self) -> None:
        """Release the feed's connection."""


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """Who holds an idempotency key: the request fingerprint and the response it created, and since when."""

    fingerprint: str
    response_id: str
    claimed_at_ms: int


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    """A conversation's own fields; its items are read page by page."""

    conversation_id: str
    created_at: int
    metadata: bytes
    active_response_id: str | None
    latest_completed_response_id: str | None
    tenant: str = "default"


class EventLogStore(Protocol):
    """Responses and their event logs: the one place events are numbered into, and read back from."""

    # Whether `start_append` can begin an append on this backend at all. False: it always declines (awaiting an
    # append here never suspends, or its commands cannot be begun without a task), so a writer need not offer it
    # each batch.
    begins_appends: bool

    async def create_response(self, new: NewResponse) -> Lease | None:
        """Admit the response in one step: its first events (sequence numbers from 0), snapshot, input items and
        request, and its place in the run index (owned by `new.owner` under the returned lease) or at the tail of
        the queue (unowned, None). Raises ResponseAlreadyExists. A response named by an Idempotency-Key has an
        id in that key's shard (`storage.keys.with_shard(id, idempotency_shard(scope, key))`), so that one step
        can change both (admission makes it so)."""

    async def append_events(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        snapshot: bytes | None,
        status: str,
        lease: Lease,
        checked: bool = False,
        after_loss: bool = False,
        outbox: Sequence[OutboxEntry] = (),
    ) -> bool:
        """Append events continuing the log, if `lease` still holds: nobody has claimed the response since (same
        owner and epoch) and it has not ended. The events are stored under the lease's epoch.

        With `snapshot` (the Response after these events; `status` its status) the snapshot is replaced in the
        same step, the retention TTL of the response's keys restarts, the lease must also be unexpired, and the
        return value says whether a cancel of the response has been requested (so an owner that missed the notice
        still learns of it). Without it (the hot path: a delta) only the events are written, as cheaply as the
        backend allows, and the return value is False; readers fold such events onto the last snapshot.

        Repeating an append that already happened (a retry after a lost reply) succeeds without writing again.
        Raises ResponseMissing, SequenceConflict (the first event's number is not last + 1; a snapshotless append
        may be refused for it only at the next append that carries a snapshot), ResponseClosed or LeaseLost, and
        LogRewound when the log ends before the first event's number - 1 (it lost events it had acknowledged).

        `checked`: a snapshotless append that still checks continuity first, as one with a snapshot does (a
        writer's first append after its store failed, which may have failed over). `after_loss`: the writer knows
        the log lost events (LogRewound) and appends past the hole, numbered after everything it had stored; only
        for its terminal event.

        `outbox`: with an append that ends the response (a terminal `status`, with its snapshot), the webhook
        deliveries it owes, put in the outbox in the same atomic step as the terminal event: a crash can never
        leave a response ended and its notification forgotten.
        """

    def start_append(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        lease: Lease,
        done: Callable[[Exception | None], None],
    ) -> bool:
        """`append_events` of a snapshotless, unchecked append, begun now without a task: `done` is called later
        (never within this call) with None once the events are stored, or with what `append_events` would have
        raised. False when the backend has no such path (its append costs no wake-up, or cannot be begun this
        way): nothing was done, and the caller awaits `append_events`. A writer at a model's pace appends every
        delta this way and reads on meanwhile, instead of its task waking for each reply."""

    async def get_response(self, response_id: str, *, tenant: str | None = None) -> ResponseRecord | None:
        """The response's snapshot and state, or None when it does not exist. With `tenant`, another tenant's
        response is None too, decided before the record is read (its size shows in no answer's timing)."""

    async def get_input_items(self, response_id: str) -> bytes | None:
        """The response's input items as a JSON array, or None when it does not exist."""

    async def read_events(
        self, response_id: str, after: int, *, limit: int = 512, after_epoch: int | None = None
    ) -> list[StoredEvent]:
        """Events with sequence_number > after, oldest first, at most `limit`. With `after_epoch` (the epoch of the
        event numbered `after` that the reader has), the events that follow *that* event in the log: when the log
        lost it and a later owner wrote other events in its place, those come back too, numbered `after` or less,
        which is how a reader learns that what it saw is gone."""

    async def delete_response(self, response_id: str, *, only_if_finished: bool = True) -> DeleteOutcome:
        """Remove every key of the response and its place in the run index and queue, atomically refusing
        (ACTIVE) while it is still queued or in progress unless only_if_finished is False."""

    def open_event_feed(self) -> EventFeed:
        """A feed for following many responses' live events with one blocking read."""
        ...


class RunQueueStore(Protocol):
    """Who runs what: the FIFO queue of unowned responses, the run index of owned ones, leases with fencing epochs,
    cancel requests, and the follow-ups of a durable end."""

    async def renew_lease(self, response_id: str, lease: Lease, *, lease_ms: int, stored_through: int = -1) -> Renewal:
        """Extend a held lease, and move the response's run index entry to the new expiry (a finished or vanished
        response keeps `lease` as it is). Raises LeaseLost when another instance owns it or the lease expired, and
        LogRewound when the log ends before `stored_through` (the last event its owner has stored)."""

    async def release_lease(self, response_id: str, lease: Lease) -> None:
        """Give the response up now (it is due at once), so another instance claims it without waiting."""

    async def claim_response(self, response_id: str, owner: str, *, lease_ms: int) -> tuple[Lease, int] | None:
        """Take over a response whose lease has expired, or take one waiting in the queue (it leaves the queue
        for the run index): a new epoch fences the old owner out. Returns the lease and how many times the
        response has been recovered; None when it is held by a live owner, finished, or gone."""

    async def due_runs(self, limit: int) -> list[str]:
        """Responses in the run index whose lease has expired (orphans, and ended ones whose follow-ups are not
        done yet), oldest first."""

    async def queued_runs(self, limit: int) -> list[str]:
        """The head of the queue: unowned responses waiting for a run slot, in admission order."""

    async def settle_response(self, response_id: str, *, idempotency_ttl_seconds: int) -> bool:
        """Once the terminal event is stored: drop the response from the run index and queue, and restart the TTL
        of the idempotency key that names it. False (and nothing changes) while the stored status is active."""

    async def abandon_admission(
        self, response_id: str, *, idempotency: tuple[str, str] | None, conversation_id: str | None
    ) -> None:
        """Undo an admission refused after its response was created, in one step: the response's keys, its index
        or queue entry, its idempotency claim and its conversation turn (each only if it still names it). A response
        another instance has claimed meanwhile is not deleted under it: its cancel is requested instead."""

    async def request_cancel(self, response_id: str) -> str | None:
        """Mark the response as to be cancelled and notify every instance (a CANCEL notice); returns its status at
        that moment (None when it does not exist). A terminal response is left untouched."""

    async def announce_queued(self, response_id: str) -> None:
        """Tell every instance (a QUEUED notice) that the response waits in the queue, once its admission is
        complete (its conversation turn taken): an instance with a free slot then starts it without waiting for
        its next sweep."""

    def run_notices(self) -> AsyncIterator[RunNotice]:
        """Cancels requested and responses queued, on any instance, as they happen."""
        ...


class SteeringStore(Protocol):
    """Steering input queued for a running response, kept beside it (same shard, same retention)."""

    async def queue_steer(self, response_id: str, steer: bytes, *, max_pending: int) -> SteerQueueOutcome:
        """Queue `steer` while the response has not ended, and notify its owner (a STEER notice)."""
        ...

    async def steer_state(self, response_id: str) -> SteerState: ...

    async def resolve_steers(self, response_id: str, outcome: str) -> None:
        """Record what became of the queued steers when no successor commits them (`pending`, `failed:<code>`)."""
        ...


class IdempotencyStore(Protocol):
    """Idempotency-Key claims: one winner per key, across instances."""

    async def claim_idempotency_key(
        self, scope: str, key: str, *, fingerprint: str, response_id: str, ttl_seconds: int
    ) -> IdempotencyClaim | None:
        """Claim `key` (within `scope`, e.g. a tenant) for `response_id`: None when this call won it, else the
        existing claim, untouched. One atomic step, so concurrent claims on any instance have one winner."""

    async def replace_idempotency_claim(
        self, scope: str, key: str, *, expected_response_id: str, claim: IdempotencyClaim, ttl_seconds: int
    ) -> bool:
        """Hand an abandoned claim (its response was never created) to a new request, only if it still names
        `expected_response_id`. True when replaced."""

    async def release_idempotency_key(self, scope: str, key: str, *, response_id: str) -> None:
        """Drop the claim if it still names `response_id` (its admission failed, so a retry may start afresh)."""


class ConversationStore(Protocol):
    """Conversations: items in order, and the one-turn-at-a-time lock."""

    async def create_conversation(
        self,
        conversation_id: str,
        *,
        created_at: int,
        metadata: bytes,
        items: Sequence[tuple[str, bytes]],
        tenant: str = "default",
    ) -> None:
        """Create a conversation with its first items (id, JSON), owned by `tenant`. Raises ResponseAlreadyExists
        on a clash."""

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation, or None."""

    async def set_conversation_metadata(self, conversation_id: str, metadata: bytes) -> None:
        """Replace the metadata. Raises ConversationMissing."""

    async def delete_conversation(self, conversation_id: str) -> bool:
        """Remove the conversation and all its items. True when something was deleted."""

    async def append_conversation_items(self, conversation_id: str, items: Sequence[tuple[str, bytes]]) -> str | None:
        """Append items unless a turn is running (then its response id is returned and nothing changes).
        Raises ConversationMissing."""

    async def begin_conversation_turn(self, conversation_id: str, response_id: str) -> str | None:
        """Make `response_id` the conversation's active response, atomically, unless another one already is: then
        that one's id is returned and nothing changes. Taking its own turn again is a no-op. Raises
        ConversationMissing."""

    async def end_conversation_turn(
        self, conversation_id: str, response_id: str, *, completed: bool, items: Sequence[tuple[str, bytes]]
    ) -> bool:
        """Release the turn held by `response_id` and append `items` (its input then output, or none), and if it
        completed make it the latest completed response, in the same step. False when it no longer held the
        turn."""

    async def clear_conversation_turn(self, conversation_id: str, response_id: str) -> bool:
        """Release the turn if `response_id` (found gone) still holds it."""

    async def list_conversation_items(
        self, conversation_id: str, *, after: str | None, limit: int, order: str
    ) -> tuple[list[bytes], bool]:
        """A page of items (JSON) in `order` ('asc' oldest first, 'desc' newest first) after the item `after`,
        and whether more follow. Raises CursorNotFound for an unknown `after`."""

    async def get_conversation_item(self, conversation_id: str, item_id: str) -> bytes | None:
        """One item's JSON, or None."""

    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        """Remove one item. False when there was no such item. Raises ConversationMissing."""


class WebhookOutboxStore(Protocol):
    """Webhook deliveries owed, written with the terminal event that owes them (`append_events(outbox=...)`) and
    taken by whichever instance's sender gets there first. An entry is claimed for a while, not removed: a sender
    that dies with it leaves it due again once the claim lapses (at least once, never lost)."""

    async def due_webhooks(self, limit: int, *, claim_ms: int) -> list[OutboxEntry]:
        """Up to `limit` entries due now, each claimed for `claim_ms` (not due again for anyone until then)."""

    async def webhook_done(self, entry: OutboxEntry) -> None:
        """Remove a delivered (or given up) entry from the outbox."""

    async def retry_webhook(self, entry: OutboxEntry, *, delay_ms: int) -> None:
        """Make a claimed entry due again in `delay_ms` (a failed attempt); nothing if it is gone."""


class Store(
    EventLogStore, RunQueueStore, IdempotencyStore, ConversationStore, SteeringStore, WebhookOutboxStore, Protocol
):
    """Persistence of responses, runs, keys and conversations. Every write sets the retention TTL of what it
    touches."""

    async def ping(self) -> None:
        """Raise if the backend cannot be reached."""

    async def close(self) -> None:
        """Release connections and background tasks."""
