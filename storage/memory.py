"""The embedded backend: the Store contract in process memory, for a single zero-setup gateway."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from storage.base import (
    DeleteOutcome,
    IdempotencyClaim,
    Lease,
    LeaseLost,
    LogRewound,
    NewResponse,
    NoticeKind,
    OutboxEntry,
    Renewal,
    ResponseAlreadyExists,
    ResponseClosed,
    ResponseMissing,
    ResponseRecord,
    RunNotice,
    SequenceConflict,
    SteerQueueOutcome,
    SteersTaken,
    SteerState,
    StoredEvent,
)
from storage.fold import fold_events
from storage.memory_conversations import Conversation, MemoryConversations
from storage.status import TERMINAL_STATUSES


@dataclass(slots=True)
class _Entry:
    snapshot: bytes  # as of events[snapshot_seq]; the events after it are folded in by readers
    status: str
    background: bool
    stored: bool
    input_items: bytes
    # Each stored event as (type, data, epoch); its sequence number is its index. A tuple of a string, bytes and an
    # int is dropped from the garbage collector's tracking once it has survived a collection, so a store holding
    # millions of events does not make every full collection walk them (a stored object would be walked each time).
    events: list[tuple[str, bytes, int]]
    expires_at: float
    request: bytes = b"{}"
    owner: str = ""
    epoch: int = 1
    lease_until_ms: int = 0
    recovery_count: int = 0
    tenant: str = "default"
    cancel_requested: bool = False
    idempotency: tuple[str, str] | None = None
    conversation_id: str | None = None
    snapshot_seq: int = -1
    steers: list[bytes] = field(default_factory=list)
    successor: str | None = None
    steer_outcome: str | None = None


class MemoryStore(MemoryConversations):
    """Store kept in this process. Same semantics as the Redis backend, including retention expiry."""

    def __init__(self, *, retention_seconds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._retention = float(retention_seconds)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # Response ids, least recently written first. Retention is one constant, so this is also expiry order:
        # one slot per response, moved to the end on write and dropped on delete, expired from the front.
        self._expiry: OrderedDict[str, None] = OrderedDict()
        # Set (and dropped) at the next append, for event feeds waiting on any response: see next_append. Made only
        # when a feed asks for it: an Event made at every append cost one per event.
        self._any_append: asyncio.Event | None = None
        # No response expires before this time of `clock` (the front of `_expiry` did not, when last looked at, and the
        # front only ever moves later): until then `_expire_due` need not look.
        self._expiry_floor = -math.inf
        self._notice_listeners: set[asyncio.Queue[RunNotice]] = set()
        # (scope, key) -> (claim, expires_at)
        self._claims: dict[tuple[str, str], tuple[IdempotencyClaim, float]] = {}
        self._claims_sweep_at = 1024
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        # Owned responses -> lease expiry (ms); unowned ones waiting, in admission order (dicts keep it).
        self._run_index: dict[str, int] = {}
        self._queue: dict[str, None] = {}
        # Webhook deliveries owed -> when each is due (ms).
        self._outbox: dict[OutboxEntry, int] = {}

    def _expire_due(self) -> None:
        now = self._clock()
        if now < self._expiry_floor:
            return
        while self._expiry:
            response_id = next(iter(self._expiry))
            entry = self._entries.get(response_id)
            if entry is not None and entry.expires_at > now:
                self._expiry_floor = entry.expires_at
                return
            self._forget(response_id)
        self._expiry_floor = -math.inf

    def _live(self, response_id: str) -> _Entry | None:
        self._expire_due()
        return self._entries.get(response_id)

    def _touch(self, response_id: str, entry: _Entry) -> None:
        entry.expires_at = self._clock() + self._retention
        self._expiry[response_id] = None
        self._expiry.move_to_end(response_id)

    def _forget(self, response_id: str) -> None:
        self._entries.pop(response_id, None)
        self._expiry.pop(response_id, None)

    def _wake_readers(self) -> None:
        if self._any_append is not None:
            self._any_append.set()
            self._any_append = None

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    async def create_response(self, new: NewResponse) -> Lease | None:
        if self._live(new.response_id) is not None:
            raise ResponseAlreadyExists(new.response_id)
        if new.takes_steers is not None:
            steered_id, count = new.takes_steers
            steered = self._live(steered_id)
            if steered is None or len(steered.steers) != count or steered.successor is not None:
                raise SteersTaken(steered_id)
            steered.steers = []
            steered.successor = new.response_id
        lease_until = self._now_ms() + new.lease_ms if new.owner else 0
        entry = _Entry(
            snapshot=_kept(new.snapshot),
            status=new.status,
            background=new.background,
            stored=new.stored,
            input_items=_kept(new.input_items),
            events=[_kept_event(event, event.epoch) for event in new.events],
            expires_at=0.0,
            request=new.request,
            owner=new.owner,
            lease_until_ms=lease_until,
            tenant=new.tenant,
            idempotency=new.idempotency,
            conversation_id=new.conversation_id,
            snapshot_seq=len(new.events) - 1,
        )
        self._entries[new.response_id] = entry
        self._touch(new.response_id, entry)
        if new.owner:
            self._run_index[new.response_id] = lease_until
        else:
            self._queue[new.response_id] = None
        return Lease(new.owner, 1, lease_until) if new.owner else None

    # Awaiting `append_events` here never suspends: a begun append would save no wake-up.
    begins_appends = False

    def start_append(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        lease: Lease,
        done: Callable[[Exception | None], None],
    ) -> bool:
        return False

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
        # `checked` and `after_loss` concern a log that lost acknowledged events, which this in-process one never
        # does: every append here is checked, and none is ever past a hole.
        if not events:
            return False
        entry = self._live(response_id)
        if entry is None:
            raise ResponseMissing(response_id)
        # Fencing first, as in Redis: a snapshotless append is refused once another owner has claimed the response
        # (its entry ids would be below the stream's); one with a snapshot also once the lease has expired.
        if entry.owner != lease.owner or entry.epoch != lease.epoch:
            raise LeaseLost(response_id)
        if (snapshot is not None or checked or after_loss) and not self._holds(entry, lease):
            raise LeaseLost(response_id)  # as the Redis script, which every such append runs
        if events[0].sequence_number != len(entry.events):
            final = events[-1]
            if final.sequence_number < len(entry.events) and entry.events[final.sequence_number][1] == final.data:
                return entry.cancel_requested and snapshot is not None  # a repeated append: already stored
            if events[0].sequence_number > len(entry.events):
                raise LogRewound(response_id, len(entry.events) - 1)  # a hole: as in Redis
            raise SequenceConflict(f"{response_id}: append from {events[0].sequence_number} does not continue the log")
        if entry.status in TERMINAL_STATUSES:
            raise ResponseClosed(response_id)
        entry.events.extend([_kept_event(event, lease.epoch) for event in events])
        self._wake_readers()
        if snapshot is None:
            return False
        entry.snapshot = _kept(snapshot)
        entry.snapshot_seq = len(entry.events) - 1
        entry.status = status
        if status in TERMINAL_STATUSES:
            now = self._now_ms()
            self._outbox.update(dict.fromkeys(outbox, now))
        self._touch(response_id, entry)
        return entry.cancel_requested

    async def due_webhooks(self, limit: int, *, claim_ms: int) -> list[OutboxEntry]:
        now = self._now_ms()
        due = sorted((at, index, entry) for index, (entry, at) in enumerate(self._outbox.items()) if at <= now)
        taken = [entry for _, _, entry in due[:limit]]
        self._outbox.update(dict.fromkeys(taken, now + claim_ms))
        return taken

    async def webhook_done(self, entry: OutboxEntry) -> None:
        self._outbox.pop(entry, None)

    async def retry_webhook(self, entry: OutboxEntry, *, delay_ms: int) -> None:
        if entry in self._outbox:
            self._outbox[entry] = self._now_ms() + delay_ms

    def _holds(self, entry: _Entry, lease: Lease) -> bool:
        return entry.owner == lease.owner and entry.epoch == lease.epoch and entry.lease_until_ms >= self._now_ms()

    async def renew_lease(self, response_id: str, lease: Lease, *, lease_ms: int, stored_through: int = -1) -> Renewal:
        entry = self._live(response_id)
        if entry is None or entry.status in TERMINAL_STATUSES:
            return Renewal(lease, False)  # it ended (or expired away) meanwhile: nothing to renew, nothing lost
        if not self._holds(entry, lease):
            raise LeaseLost(response_id)
        entry.lease_until_ms = self._now_ms() + lease_ms
        self._run_index[response_id] = entry.lease_until_ms
        return Renewal(Lease(lease.owner, lease.epoch, entry.lease_until_ms), entry.cancel_requested)

    async def release_lease(self, response_id: str, lease: Lease) -> None:
        entry = self._live(response_id)
        if entry is not None and entry.status not in TERMINAL_STATUSES and self._holds(entry, lease):
            entry.lease_until_ms = 0
            self._run_index[response_id] = 0

    async def claim_response(self, response_id: str, owner: str, *, lease_ms: int) -> tuple[Lease, int] | None:
        entry = self._live(response_id)
        if entry is None or entry.status in TERMINAL_STATUSES:
            self._queue.pop(response_id, None)  # as in lease.lua: nothing to run never blocks the queue's head
            if entry is None:
                self._run_index.pop(response_id, None)
            return None
        if entry.owner and entry.lease_until_ms >= self._now_ms():
            return None
        if entry.owner:
            entry.recovery_count += 1
        entry.owner, entry.epoch = owner, entry.epoch + 1
        entry.lease_until_ms = self._now_ms() + lease_ms
        self._queue.pop(response_id, None)
        self._run_index[response_id] = entry.lease_until_ms
        return Lease(owner, entry.epoch, entry.lease_until_ms), entry.recovery_count

    async def due_runs(self, limit: int) -> list[str]:
        now = self._now_ms()
        due = sorted((due_ms, response_id) for response_id, due_ms in self._run_index.items() if due_ms <= now)
        return [response_id for _, response_id in due[:limit]]

    async def queued_runs(self, limit: int) -> list[str]:
        head: list[str] = []
        for response_id in self._queue:
            if len(head) == limit:
                break
            head.append(response_id)
        return head

    async def settle_response(self, response_id: str, *, idempotency_ttl_seconds: int) -> bool:
        entry = self._live(response_id)
        if entry is not None and entry.status not in TERMINAL_STATUSES:
            return False
        if entry is not None and entry.steers and entry.steer_outcome is None:
            return False  # its steering input is not resolved yet (runs/steering.py: resolve_after_end)
        self._run_index.pop(response_id, None)
        self._queue.pop(response_id, None)
        if entry is not None and entry.idempotency is not None:
            claim = self._live_claim(*entry.idempotency)
            if claim is not None and claim.response_id == response_id:
                self._claims[entry.idempotency] = (claim, self._clock() + idempotency_ttl_seconds)
        return True

    async def abandon_admission(
        self, response_id: str, *, idempotency: tuple[str, str] | None, conversation_id: str | None
    ) -> None:
        entry = self._entries.get(response_id)
        if entry is not None and entry.epoch != 1:  # claimed by another owner meanwhile: as in the Lua script
            entry.cancel_requested = True
            return
        if entry is not None:
            self._forget(response_id)
            self._wake_readers()
        self._run_index.pop(response_id, None)
        self._queue.pop(response_id, None)
        if idempotency is not None:
            claim = self._live_claim(*idempotency)
            if claim is not None and claim.response_id == response_id:
                del self._claims[idempotency]
        if conversation_id is not None:
            conversation = self._conversation(conversation_id)
            if conversation is not None and conversation.active == response_id:
                conversation.active = None

    async def get_response(self, response_id: str, *, tenant: str | None = None) -> ResponseRecord | None:
        entry = self._live(response_id)
        if entry is None or (tenant is not None and entry.tenant != tenant):
            return None
        snapshot = entry.snapshot
        if entry.snapshot_seq < len(entry.events) - 1:
            snapshot = fold_events(snapshot, (data for _, data, _ in entry.events[entry.snapshot_seq + 1 :]))
        return ResponseRecord(
            response_id=response_id,
            snapshot=snapshot,
            status=entry.status,
            last_sequence_number=len(entry.events) - 1,
            background=entry.background,
            stored=entry.stored,
            request=entry.request,
            owner=entry.owner,
            lease_until_ms=entry.lease_until_ms,
            recovery_count=entry.recovery_count,
            tenant=entry.tenant,
            cancel_requested=entry.cancel_requested,
            conversation_id=entry.conversation_id,
            keyed=entry.idempotency is not None,
            last_epoch=entry.events[-1][2] if entry.events else 1,
        )

    async def get_input_items(self, response_id: str) -> bytes | None:
        entry = self._live(response_id)
        return None if entry is None else entry.input_items

    async def read_events(
        self, response_id: str, after: int, *, limit: int = 512, after_epoch: int | None = None
    ) -> list[StoredEvent]:
        return self.events_after(response_id, after, limit)  # never rewound: the epoch adds nothing here

    async def delete_response(self, response_id: str, *, only_if_finished: bool = True) -> DeleteOutcome:
        entry = self._live(response_id)
        if entry is None:
            return DeleteOutcome.MISSING
        if only_if_finished and entry.status not in TERMINAL_STATUSES:
            return DeleteOutcome.ACTIVE
        self._forget(response_id)
        self._run_index.pop(response_id, None)
        self._queue.pop(response_id, None)
        self._wake_readers()
        return DeleteOutcome.DELETED

    async def request_cancel(self, response_id: str) -> str | None:
        entry = self._live(response_id)
        if entry is None:
            return None
        if entry.status not in TERMINAL_STATUSES:
            entry.cancel_requested = True
            self._notify(RunNotice(NoticeKind.CANCEL, response_id))
        return entry.status

    async def queue_steer(self, response_id: str, steer: bytes, *, max_pending: int) -> SteerQueueOutcome:
        entry = self._live(response_id)
        if entry is None:
            return SteerQueueOutcome.MISSING
        if entry.status in TERMINAL_STATUSES:
            return SteerQueueOutcome.ENDED
        if len(entry.steers) >= max_pending:
            return SteerQueueOutcome.FULL
        entry.steers.append(steer)
        self._notify(RunNotice(NoticeKind.STEER, response_id))
        return SteerQueueOutcome.QUEUED

    async def steer_state(self, response_id: str) -> SteerState:
        entry = self._live(response_id)
        if entry is None:
            return SteerState(())
        return SteerState(tuple(entry.steers), entry.successor, entry.steer_outcome)

    async def resolve_steers(self, response_id: str, outcome: str) -> None:
        entry = self._live(response_id)
        if entry is not None and entry.steers and entry.successor is None and entry.steer_outcome is None:
            entry.steer_outcome = outcome

    async def run_notices(self) -> AsyncIterator[RunNotice]:
        listener: asyncio.Queue[RunNotice] = asyncio.Queue()
        self._notice_listeners.add(listener)
        try:
            while True:
                yield await listener.get()
        finally:
            self._notice_listeners.discard(listener)

    async def announce_queued(self, response_id: str) -> None:
        self._notify(RunNotice(NoticeKind.QUEUED, response_id))

    def _notify(self, notice: RunNotice) -> None:
        for listener in self._notice_listeners:
            listener.put_nowait(notice)

    def _live_claim(self, scope: str, key: str) -> IdempotencyClaim | None:
        held = self._claims.get((scope, key))
        if held is None:
            return None
        if held[1] <= self._clock():
            del self._claims[(scope, key)]
            return None
        return held[0]

    async def claim_idempotency_key(
        self, scope: str, key: str, *, fingerprint: str, response_id: str, ttl_seconds: int
    ) -> IdempotencyClaim | None:
        existing = self._live_claim(scope, key)
        if existing is not None:
            return existing
        claim = IdempotencyClaim(fingerprint, response_id, int(time.time() * 1000))
        self._claims[(scope, key)] = (claim, self._clock() + ttl_seconds)
        if len(self._claims) >= self._claims_sweep_at:
            # Expired claims nobody asks about again are dropped here, amortised over the claims made.
            now = self._clock()
            self._claims = {name: held for name, held in self._claims.items() if held[1] > now}
            self._claims_sweep_at = max(1024, 2 * len(self._claims))
        return None

    async def replace_idempotency_claim(
        self, scope: str, key: str, *, expected_response_id: str, claim: IdempotencyClaim, ttl_seconds: int
    ) -> bool:
        existing = self._live_claim(scope, key)
        if existing is None or existing.response_id != expected_response_id:
            return False
        self._claims[(scope, key)] = (claim, self._clock() + ttl_seconds)
        return True

    async def release_idempotency_key(self, scope: str, key: str, *, response_id: str) -> None:
        existing = self._live_claim(scope, key)
        if existing is not None and existing.response_id == response_id:
            del self._claims[(scope, key)]

    def next_append(self) -> asyncio.Event:
        """The event set at the next append to any response. Take it in the same step as looking at the events
        (no await in between), then wait on it: an append in between has then set it, not a later one."""
        if self._any_append is None:
            self._any_append = asyncio.Event()
        return self._any_append

    def open_event_feed(self) -> MemoryEventFeed:
        return MemoryEventFeed(self)

    def events_after(self, response_id: str, after: int, limit: int) -> list[StoredEvent]:
        """Stored events after a cursor, without waiting (shared by read_events and the event feed)."""
        entry = self._live(response_id)
        if entry is None or len(entry.events) - 1 <= after:
            return []
        start = max(after + 1, 0)
        return [
            StoredEvent(number, kind, data, epoch)
            for number, (kind, data, epoch) in enumerate(entry.events[start : start + limit], start)
        ]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._claims.clear()
        self._conversations.clear()
        self._expiry.clear()


class MemoryEventFeed:
    """The embedded store's feed: checks every watched response, then waits for the next append anywhere."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._interrupted = asyncio.Event()

    async def read(self, cursors: Mapping[str, int], *, wait_ms: int) -> dict[str, list[StoredEvent]]:
        # Both wake-ups are taken in the same step as the look at the events. A waiter that fetched them only once
        # it first ran missed an append landing in between (the append sets and replaces the event), and the read
        # slept out its whole wait_ms with the event already stored.
        appended = self._store.next_append()
        interrupted = self._interrupted
        found = self._collect(cursors)
        if found or wait_ms <= 0:
            return found
        waiters = {asyncio.ensure_future(appended.wait()), asyncio.ensure_future(interrupted.wait())}
        try:
            await asyncio.wait(waiters, timeout=wait_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._collect(cursors)

    def _collect(self, cursors: Mapping[str, int]) -> dict[str, list[StoredEvent]]:
        found = {}
        for response_id, after in cursors.items():
            events = self._store.events_after(response_id, after, 512)
            if events:
                found[response_id] = events
        return found

    async def interrupt(self) -> None:
        # Wakes the read in progress only, as CLIENT UNBLOCK does for the Redis feed: a read that starts later is
        # given cursors that already include the change. Set and replaced rather than cleared by the read, so an
        # interrupt landing while a read is returning is never wiped out by it.
        self._interrupted.set()
        self._interrupted = asyncio.Event()

    async def close(self) -> None:
        return None


def _kept(data: bytes) -> bytes:
    """A copy of exactly its size, for bytes the store keeps for the retention period: orjson's result keeps the
    larger buffer it was written into (a 200-byte event can hold 4 KB)."""
    return memoryview(data).tobytes()


def _kept_event(event: StoredEvent, epoch: int) -> tuple[str, bytes, int]:
    """The store's own copy of an appended event, under the epoch of the lease that appended it."""
    return (event.type, _kept(event.data), epoch)
