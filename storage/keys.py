"""Every Redis key name the gateway uses, built from one prefix, with a Cluster hash tag per response."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Entry ids of a response's event stream are `<EVENT_ID_EPOCH>-<sequence_number>`. Redis refuses the id `0-0`, so
# the event with sequence_number 0 cannot live at `0-0`; a fixed first part of 1 keeps the second part equal to the
# sequence number and lets Redis itself reject a duplicate or stale append (ids must grow).
EVENT_ID_EPOCH = 1


def event_entry_id(sequence_number: int) -> str:
    """The stream entry id of the event with this sequence number."""
    return f"{EVENT_ID_EPOCH}-{sequence_number}"


def after_entry_id(sequence_number: int) -> str:
    """The exclusive stream cursor for `events after sequence_number` (-1 means from the start)."""
    return "0-0" if sequence_number < 0 else event_entry_id(sequence_number)


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
