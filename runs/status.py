"""Response status: the enum and its sets (defined once, in storage.status), the status events, and the one place
transitions are checked."""

from __future__ import annotations

from storage.status import ACTIVE, TERMINAL, ResponseStatus

__all__ = [
    "ACTIVE",
    "CONTINUABLE",
    "STATUS_EVENT_TYPE",
    "TERMINAL",
    "TERMINAL_EVENT_TYPES",
    "InvalidTransition",
    "ResponseStatus",
    "check_transition",
]

_ALLOWED: dict[ResponseStatus, frozenset[ResponseStatus]] = {
    ResponseStatus.QUEUED: frozenset({ResponseStatus.IN_PROGRESS}) | TERMINAL,
    ResponseStatus.IN_PROGRESS: TERMINAL,
}

# The event that carries a response into each status, for events that end or advance the run.
STATUS_EVENT_TYPE: dict[ResponseStatus, str] = {
    ResponseStatus.QUEUED: "response.queued",
    ResponseStatus.IN_PROGRESS: "response.in_progress",
    ResponseStatus.COMPLETED: "response.completed",
    ResponseStatus.FAILED: "response.failed",
    # OpenAI has no `response.cancelled` event and the SDK's models know none, so a cancelled response ends with
    # `response.failed` whose response carries status "cancelled".
    ResponseStatus.CANCELLED: "response.failed",
    ResponseStatus.INCOMPLETE: "response.incomplete",
}

TERMINAL_EVENT_TYPES = frozenset(STATUS_EVENT_TYPE[status] for status in TERMINAL)

# The ends a later turn builds on (by previous_response_id, or in a conversation): the output so far is history.
# A failed or cancelled turn is not a checkpoint.
CONTINUABLE = frozenset({ResponseStatus.COMPLETED, ResponseStatus.INCOMPLETE})


class InvalidTransition(Exception):
    """A status change the lifecycle does not allow (a bug, not a client error)."""


def check_transition(current: ResponseStatus, new: ResponseStatus) -> None:
    """Raise InvalidTransition unless a response may move from `current` to `new`."""
    if new not in _ALLOWED.get(current, frozenset()):
        raise InvalidTransition(f"{current} -> {new}")
