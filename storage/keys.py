"""Every Redis key name the gateway uses, built from one prefix, with a Cluster hash tag per shard."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

# Responses are spread over SHARDS shards. A shard is one Redis Cluster hash slot: a response's keys, the run index
# and queue of its shard and the Idempotency-Key that names it all share the shard's hash tag, so every script a
# response's life runs (admit, append, claim, settle, undo) touches one slot, and no index or queue is one hot key
# of the whole fleet. The shard is part of the id (its last two hex digits, below), so finding it needs no lookup.
# Fixed: changing it would move every stored response to another key.
SHARDS = 64

# Entry ids of a response's event stream are `<epoch>-<sequence_number>`, `epoch` being the lease epoch of the
# writer that appended it (1 for the first owner, or for the events admission writes). Redis refuses an id not
# above the stream's last one, so when an instance claims a response the claim moves the stream's last id to
# `<new epoch>-<last sequence number>` (XSETID): every later append of the old owner, whose ids start with the
# old epoch, is refused by Redis itself, with no read before the write. A terminal write moves it past every id
# of its own epoch too. The claims are recorded in the state hash (`epochs`: `epoch:first sequence number` pairs)
# so that a reader that knows only a sequence number can find its entry id.


def event_entry_id(sequence_number: int, epoch: int = 1) -> str:
    """The stream entry id of the event with this sequence number, written under lease `epoch`."""
    return f"{epoch}-{sequence_number}"


def after_entry_id(sequence_number: int, epoch: int = 1) -> str:
    """The exclusive stream cursor for `events after sequence_number` (-1 means from the start), when the event
    with that number was written under lease `epoch`."""
    return "0-0" if sequence_number < 0 else event_entry_id(sequence_number, epoch)


def epoch_at(epochs: str, sequence_number: int) -> int:
    """The epoch under which the event `sequence_number` was written, from the state hash's `epochs` record
    (`"1:0,3:57"`: epoch 3 wrote from sequence number 57 on). Empty or unknown: 1."""
    found = 1
    for pair in epochs.split(","):
        if not pair:
            continue
        epoch, first = pair.split(":")
        if int(first) <= sequence_number:
            found = max(found, int(epoch))
    return found


def shard_of(object_id: str) -> int:
    """The shard of a response id: its last two hex digits, modulo SHARDS (ids are `<prefix>_<32 hex digits>`).
    An id of another shape (a client's typo) still maps to some shard, where it is simply not found."""
    tail = object_id[-2:]
    try:
        return int(tail, 16) % SHARDS
    except ValueError:
        return zlib.crc32(object_id.encode()) % SHARDS


def with_shard(object_id: str, shard: int) -> str:
    """`object_id` with its last two hex digits set so that it lands in `shard` (the rest stays random)."""
    base = int(object_id[-2:], 16) // SHARDS * SHARDS
    return f"{object_id[:-2]}{base + shard:02x}"


def idempotency_shard(scope: str, key: str) -> int:
    """The shard an Idempotency-Key's claim lives in; the response it names is made in the same shard."""
    return int(_idempotency_digest(scope, key)[:2], 16) % SHARDS


def _idempotency_digest(scope: str, key: str) -> str:
    return hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names under one prefix. A response's keys carry its shard's hash tag (`{<prefix>:<shard>}`), as do its
    shard's run index, queue and Idempotency-Key claims; a conversation's keys carry its own id as their tag."""

    prefix: str

    def shard_tag(self, shard: int) -> str:
        # The prefix is inside the tag too: two deployments sharing a cluster spread over different slots.
        return f"{self.prefix}:{{{self.prefix}:{shard}}}"

    def response_state(self, response_id: str) -> str:
        """Hash: the Response snapshot and the fields the run keeps beside it (status, last sequence number)."""
        return f"{self.shard_tag(shard_of(response_id))}:{response_id}:state"

    def response_events(self, response_id: str) -> str:
        """Stream: the response's events, entry id `1-<sequence_number>`, payload field `d`, type field `t`."""
        return f"{self.shard_tag(shard_of(response_id))}:{response_id}:events"

    def response_input(self, response_id: str) -> str:
        """String: the response's input items as a JSON array (for input_items and previous_response_id)."""
        return f"{self.shard_tag(shard_of(response_id))}:{response_id}:input"

    def response_steers(self, response_id: str) -> str:
        """List: steering input queued for the response (JSON each, in submission order), until a successor
        commits it; kept with the response's other keys (same slot, same retention)."""
        return f"{self.shard_tag(shard_of(response_id))}:{response_id}:steers"

    def response_state_pattern(self) -> str:
        """A SCAN pattern that matches every response's state hash (for tests and operators)."""
        return f"{self.prefix}:{{{self.prefix}:*}}:*:state"

    def response_keys_pattern(self) -> str:
        """A SCAN pattern that matches every key of every response (ids start with `resp_`)."""
        return f"{self.prefix}:{{{self.prefix}:*}}:resp_*"

    @staticmethod
    def response_id_in(key: str) -> str:
        """The response id in the name of one of its keys."""
        return key.split("}:", 1)[1].rsplit(":", 1)[0]

    def response_keys(self, response_id: str) -> tuple[str, str, str]:
        """All keys of one response, in the order the Lua scripts take them."""
        return (
            self.response_state(response_id),
            self.response_events(response_id),
            self.response_input(response_id),
        )

    def conversation_keys(self, conversation_id: str) -> tuple[str, str, str]:
        """A conversation's hash (fields, turn lock), items hash (id → JSON) and order list (ids), one slot."""
        base = f"{self.prefix}:{{{conversation_id}}}"
        return f"{base}:conv", f"{base}:items", f"{base}:order"

    def idempotency(self, scope: str, key: str) -> str:
        """String (JSON claim) for an Idempotency-Key within a scope. The client's key is hashed: it never appears
        in a key name, and every name has the same short length."""
        return f"{self.shard_tag(idempotency_shard(scope, key))}:idem:{_idempotency_digest(scope, key)}"

    def run_index(self, shard: int) -> str:
        """Sorted set: the shard's owned responses, scored by when their lease expires (due for a look then: an
        orphan, or an ended one whose follow-ups are not done). An index only: the truth is each state hash."""
        return f"{self.shard_tag(shard)}:runs"

    def run_queue(self, shard: int) -> str:
        """Sorted set: the shard's unowned responses waiting for a run slot, scored by admission time (Redis
        microseconds), so they start in admission order."""
        return f"{self.shard_tag(shard)}:queue"

    def webhook_outbox(self, shard: int) -> str:
        """Sorted set: the shard's webhook deliveries owed (`<response id> <payload>`), scored by when each is due
        (Redis ms): written with the terminal event that owes it, pushed later while claimed or after a failure."""
        return f"{self.shard_tag(shard)}:webhooks"

    def response_index(self, response_id: str) -> tuple[str, str]:
        """The run index and queue of the response's shard, in the order the Lua scripts take them."""
        shard = shard_of(response_id)
        return self.run_index(shard), self.run_queue(shard)

    def notice_channel(self, shard: int | None = None) -> str:
        """Pub/sub channel (not a key: nothing stored, no TTL) on which run notices (a cancel requested, a response
        queued) reach every instance: one for all on a single node; on a cluster, one per shard in its slot, for
        sharded pub/sub."""
        return f"{self.prefix}:notices" if shard is None else f"{self.shard_tag(shard)}:notices"
