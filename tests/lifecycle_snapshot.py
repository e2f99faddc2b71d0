"""A consistent picture of everything the lifecycle keeps in a store (read in one atomic step), and the invariants
that must hold in it between any two store steps, whatever crashed where."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import redis

from runs.status import TERMINAL_EVENT_TYPES, ResponseStatus
from storage.fold import fold_events
from storage.keys import SHARDS, KeySpace
from storage.memory import MemoryStore
from storage.status import TERMINAL_STATUSES

STATUSES = frozenset(status.value for status in ResponseStatus)
SCOPE = "default"  # the idempotency scope (tenant) every request of the tests uses


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: str
    snapshot: bytes
    last_sequence_number: int
    owner: str
    epoch: int
    lease_until_ms: int
    stored: bool
    conversation_id: str | None
    events: list[tuple[int, str, bytes]]  # (sequence number, type, data)


@dataclass(slots=True)
class StoreSnapshot:
    responses: dict[str, StoredResponse] = field(default_factory=dict)
    run_index: dict[str, int] = field(default_factory=dict)  # response id -> score (lease expiry, ms)
    queue: list[str] = field(default_factory=list)
    turns: dict[str, str | None] = field(default_factory=dict)  # existing conversation -> its active response
    claims: dict[str, str] = field(default_factory=dict)  # idempotency key -> the response it names
    strays: set[str] = field(default_factory=set)  # responses with events or input but no state

    def describe(self) -> str:
        lines = [f"index={self.run_index} queue={self.queue} turns={self.turns} claims={self.claims}"]
        for response_id, stored in self.responses.items():
            types = [kind for _, kind, _ in stored.events]
            lines.append(
                f"  {response_id}: {stored.status} owner={stored.owner!r} epoch={stored.epoch} "
                f"until={stored.lease_until_ms} conv={stored.conversation_id} stored={stored.stored} events={types}"
            )
        return "\n".join(lines)


def memory_snapshot(store: MemoryStore, conversations: list[str], keys: list[str]) -> StoreSnapshot:
    """Read synchronously, so no task of the loop can change anything half-way."""
    snapshot = StoreSnapshot(run_index=dict(store._run_index), queue=list(store._queue))
    for response_id, entry in store._entries.items():
        snapshot.responses[response_id] = StoredResponse(
            status=entry.status,
            snapshot=fold_events(entry.snapshot, (data for _, data, _ in entry.events[entry.snapshot_seq + 1 :])),
            last_sequence_number=len(entry.events) - 1,
            owner=entry.owner,
            epoch=entry.epoch,
            lease_until_ms=entry.lease_until_ms,
            stored=entry.stored,
            conversation_id=entry.conversation_id,
            events=[(number, kind, data) for number, (kind, data, _) in enumerate(entry.events)],
        )
    for conversation_id in conversations:
        conversation = store._conversations.get(conversation_id)
        if conversation is not None:
            snapshot.turns[conversation_id] = conversation.active
    for key in keys:
        held = store._claims.get((SCOPE, key))
        if held is not None:
            snapshot.claims[key] = held[0].response_id
    return snapshot


def redis_snapshot(client: redis.Redis, keys: KeySpace, conversations: list[str], idem: list[str]) -> StoreSnapshot:
    """Find the response ids by SCAN, then read everything in one MULTI: a script in flight runs wholly before or
    after it, so the picture is one the store really passed through."""
    ids: set[str] = set()
    for raw in client.scan_iter(match=keys.response_keys_pattern(), count=1000):
        ids.add(keys.response_id_in(raw.decode()))
    for _ in range(5):
        ordered = sorted(ids)
        pipe = client.pipeline(transaction=True)
        for shard in range(SHARDS):
            pipe.zrange(keys.run_index(shard), 0, -1, withscores=True)
            pipe.zrange(keys.run_queue(shard), 0, -1, withscores=True)
        for response_id in ordered:
            pipe.hgetall(keys.response_state(response_id))
            pipe.xrange(keys.response_events(response_id))
            pipe.exists(keys.response_input(response_id))
        for conversation_id in conversations:
            pipe.hget(keys.conversation_keys(conversation_id)[0], "active")
            pipe.exists(keys.conversation_keys(conversation_id)[0])
        for key in idem:
            pipe.get(keys.idempotency(SCOPE, key))
        reply = pipe.execute()
        index = {member.decode(): int(score) for shard in reply[0 : 2 * SHARDS : 2] for member, score in shard}
        queued = sorted((score, member.decode()) for shard in reply[1 : 2 * SHARDS : 2] for member, score in shard)
        queue = [member for _, member in queued]  # in admission order across the shards, as the sweeper takes them
        if set(index) | set(queue) <= ids:
            break
        ids |= set(index) | set(queue)  # indexed after the SCAN: read again with them
    snapshot = StoreSnapshot(run_index=index, queue=queue)
    position = 2 * SHARDS
    for response_id in ordered:
        state, entries, has_input = reply[position : position + 3]
        position += 3
        if not state:
            if entries or has_input:
                snapshot.strays.add(response_id)
            continue
        events = [(int(entry_id.decode().split("-")[1]), data[b"t"].decode(), data[b"d"]) for entry_id, data in entries]
        # What the store's own read gives: the stored snapshot with the events after it folded in.
        snapshot_seq = int(state[b"snap_seq"])
        folded = fold_events(state[b"snapshot"], (data for seq, _, data in events if seq > snapshot_seq))
        snapshot.responses[response_id] = StoredResponse(
            status=state[b"status"].decode(),
            snapshot=folded,
            last_sequence_number=events[-1][0] if events else -1,
            owner=state.get(b"owner", b"").decode(),
            epoch=int(state.get(b"epoch", b"0")),
            lease_until_ms=int(state.get(b"lease_until", b"0")),
            stored=state.get(b"stored") == b"1",
            conversation_id=state.get(b"conv", b"").decode() or None,
            events=events,
        )
    for conversation_id in conversations:
        active, exists = reply[position : position + 2]
        position += 2
        if exists:
            snapshot.turns[conversation_id] = active.decode() if active else None
    for key in idem:
        claim = reply[position]
        position += 1
        if claim is not None:
            snapshot.claims[key] = orjson.loads(claim)["response_id"]
    return snapshot


def check_store(snapshot: StoreSnapshot) -> None:
    """The invariants of the stored lifecycle, true between any two store steps."""
    assert not snapshot.strays, f"events or input left without their response: {snapshot.strays}"
    queued = set(snapshot.queue)
    assert not queued & set(snapshot.run_index), f"both queued and indexed: {queued & set(snapshot.run_index)}"
    for response_id in queued | set(snapshot.run_index):
        assert response_id in snapshot.responses, f"{response_id} is indexed or queued but does not exist"
    for response_id, stored in snapshot.responses.items():
        _check_response(response_id, stored, snapshot)
    for conversation_id, active in snapshot.turns.items():
        if active is None:
            continue
        holder = snapshot.responses.get(active)
        assert holder is not None, f"{conversation_id}'s turn is held by {active}, which does not exist"
        assert holder.conversation_id == conversation_id, f"{active} holds the turn of another conversation"
        assert holder.status not in TERMINAL_STATUSES or active in snapshot.run_index, (
            f"{active} ended {holder.status} and was settled, but still holds the turn of {conversation_id}"
        )


def _check_response(response_id: str, stored: StoredResponse, snapshot: StoreSnapshot) -> None:
    where = f"{response_id} ({stored.status})"
    assert stored.status in STATUSES, f"{where}: unknown status"
    assert orjson.loads(stored.snapshot)["status"] == stored.status, f"{where}: snapshot status differs"
    numbers = [number for number, _, _ in stored.events]
    assert numbers == list(range(len(numbers))), f"{where}: event log not contiguous from 0: {numbers}"
    assert stored.last_sequence_number == len(numbers) - 1, f"{where}: last_seq {stored.last_sequence_number}"
    assert stored.events, f"{where}: no events"
    assert stored.events[0][1] == "response.created", f"{where}: does not start with created"
    for number, kind, data in stored.events:
        event = orjson.loads(data)
        assert (event["sequence_number"], event["type"]) == (number, kind), f"{where}: event {number} mislabelled"
    terminal = [number for number, kind, _ in stored.events if kind in TERMINAL_EVENT_TYPES]
    assert len(terminal) <= 1, f"{where}: {len(terminal)} terminal events"
    assert terminal in ([], [len(numbers) - 1]), f"{where}: the terminal event is not last"
    ended = stored.status in TERMINAL_STATUSES
    assert ended == bool(terminal), f"{where}: terminal status and terminal event disagree"
    if terminal:
        final = orjson.loads(stored.events[-1][2])["response"]["status"]
        assert final == stored.status, f"{where}: the terminal event says {final}"
    if response_id in snapshot.queue:
        assert stored.status == ResponseStatus.QUEUED, f"{where}: in the queue but started"
        assert not stored.owner, f"{where}: in the queue but owned by {stored.owner}"
    if not ended:
        indexed = response_id in snapshot.run_index
        assert indexed != (response_id in snapshot.queue), f"{where}: active but neither indexed nor queued"
        if indexed:
            assert stored.owner, f"{where}: indexed without an owner"
            assert snapshot.run_index[response_id] == stored.lease_until_ms, f"{where}: index score is not the lease"


def check_quiescent(snapshot: StoreSnapshot, unforgotten: set[str]) -> None:
    """After every fault stopped and the sweepers had their time: all ended and settled, every turn released,
    every connection-owned (store=false) response forgotten but those whose instance died before it forgot them
    (`unforgotten`: their keys wait for the retention TTL)."""
    check_store(snapshot)
    active = {
        rid: stored.status for rid, stored in snapshot.responses.items() if stored.status not in TERMINAL_STATUSES
    }
    assert not active, f"still active: {active}"
    assert not snapshot.run_index, f"ended but not settled: {snapshot.run_index}"
    assert not snapshot.queue, f"still queued: {snapshot.queue}"
    held = {conversation: active for conversation, active in snapshot.turns.items() if active is not None}
    assert not held, f"turns still held: {held}"
    unstored = [rid for rid, stored in snapshot.responses.items() if not stored.stored and rid not in unforgotten]
    assert not unstored, f"store=false responses outlived their connection: {unstored}"
