"""Response status: the enum, its terminal and active sets, and the one place transitions are checked."""

from __future__ import annotations

from enum import StrEnum


class ResponseStatus(StrEnum):
    """The `status` of a Response, as the OpenAI API names it."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"


TERMINAL = frozenset(
    {ResponseStatus.COMPLETED, ResponseStatus.FAILED, ResponseStatus.CANCELLED, ResponseStatus.INCOMPLETE}
)
ACTIVE = frozenset({ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS})

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

TERMINAL_EVENT_TYPES = frozenset({"response.completed", "response.failed", "response.incomplete"})


class InvalidTransition(Exception):
    """A status change the lifecycle does not allow (a bug, not a client error)."""


def check_transition(current: ResponseStatus, new: ResponseStatus) -> None:
    """Raise InvalidTransition unless a response may move from `current` to `new`."""
    if new not in _ALLOWED.get(current, frozenset()):
        raise InvalidTransition(f"{current} -> {new}")
