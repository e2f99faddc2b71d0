"""Every Redis key name the gateway uses, built from one prefix, with a Cluster hash tag per response."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names under one prefix. `{response_id}` is the hash tag, so one response's keys share a Cluster slot."""

    prefix: str

    def response_state(self, response_id: str) -> str:
        """Hash: the Response snapshot and the fields the run keeps beside it (status, last sequence number)."""
        return f"{self.prefix}:{{{response_id}}}:state"

    def response_events(self, response_id: str) -> str:
        """Stream: the response's events, entry id `1-<sequence_number>`, payload field `d`, type field `t`."""
        return f"{self.prefix}:{{{response_id}}}:events"

    def response_input(self, response_id: str) -> str:
        """String: the response's input items as a JSON array (for input_items and previous_response_id)."""
        return f"{self.prefix}:{{{response_id}}}:input"

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
        digest = hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()
        return f"{self.prefix}:{{idem:{digest}}}"

    def run_index(self) -> str:
        """Sorted set: owned responses, scored by when their lease expires (due for a look then: an orphan, or an
        ended one whose follow-ups are not done). An index only: the truth is each response's state hash."""
        return f"{self.prefix}:runs"

    def run_queue(self) -> str:
        """Sorted set: unowned responses waiting for a run slot, scored by admission time (Redis microseconds), so
        they start in admission order."""
        return f"{self.prefix}:queue"

    def cancel_channel(self) -> str:
        """Pub/sub channel (not a key: nothing stored, no TTL) on which cancel requests reach the owning instance."""
        return f"{self.prefix}:cancel"
