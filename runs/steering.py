"""Steering: user input queued for a running response, carried into the response that continues it.

A steer is stored beside its response (storage: `queue_steer`) before anyone is told it was accepted, and only
while the response has not ended (the status check and the push are one store step). Its run, wherever it is
owned, hears a STEER notice and stops at its next safe boundary (no output item half emitted), ending
`incomplete` / `steered`; a run that misses the notice simply finishes, and the steer still applies after it.

Once the response has ended, its follow-ups (Lifecycle.settle, which the sweeper repeats for a response whose
instance died) resolve the queued input: a successor response is admitted, queued for any instance, with the
steered response's settings, `previous_response_id` set to it and the queued input as its input; creating it
commits the input in the same store step (the successor's `response.created` is the commit point), so a second
settle finds nothing to commit. A response that stopped for the client's tool outputs keeps the input `pending`:
the client's own continuation of it gets the input first. A response that failed or was cancelled fails it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from runs.admission import new_response
from runs.errors import ApiError
from runs.ids import new_id
from runs.items import Json
from runs.request import CreateResponseRequest
from runs.status import TERMINAL, ResponseStatus
from storage.base import ResponseRecord, SteerQueueOutcome, SteersTaken, SteerState, Store
from storage.keys import shard_of

log = logging.getLogger(__name__)

ACCEPTED = "response.steer.accepted"
PENDING = "response.steer.pending"
FAILED = "response.steer.failed"

PENDING_OUTCOME = "pending"
_FAILED_PREFIX = "failed:"

# How long a socket waits, after a response ended, for its queued steering to be resolved (by its owner at once, or
# by a sweeper after a lease period when the owner died in between).
RESOLVE_WAIT_SECONDS = 60.0

_STEER_PART_TYPES = frozenset({"input_text", "input_image", "input_file"})
_STEER_EVENT_FIELDS = frozenset({"type", "previous_response_id", "input"})

# A client-owned call in a response's output, and the stub of the input that answers it (`required_input`).
_REQUIRED_INPUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "function_call": ("function_call_output", ("call_id", "name")),
    "custom_tool_call": ("custom_tool_call_output", ("call_id",)),
    "computer_call": ("computer_call_output", ("call_id",)),
    "shell_call": ("shell_call_output", ("call_id",)),
    "apply_patch_call": ("apply_patch_call_output", ("call_id",)),
}

_MESSAGES = {
    "response_not_found": "The response to steer was not found.",
    "invalid_input": "Steering input must be a non-empty string or a non-empty list of user messages.",
    "steering_not_supported": "Responses bound to a conversation or using automatic compaction cannot be steered.",
    "too_many_pending_steers": "Too much steering input is pending for this response; wait for its continuation.",
    "response_already_completed": "The response has completed and no longer accepts steering input.",
    "response_not_active": "The response is no longer accepting steering input.",
    "successor_creation_failed": "The response that would continue with the steering input could not be created.",
}
_STATUS = {
    "response_not_found": 404,
    "too_many_pending_steers": 429,
    "response_already_completed": 409,
    "response_not_active": 409,
    "successor_creation_failed": 409,
}


class SteerRefused(ApiError):
    """Steering input that cannot be queued, with the steering error code the SDK knows."""

    type = "invalid_request_error"

    def __init__(self, code: str, message: str | None = None, *, stream_id: str | None = None) -> None:
        super().__init__(message or _MESSAGES[code], code=code, status=_STATUS.get(code, 400), param=_param(code))
        self.stream_id = stream_id


def _param(code: str) -> str | None:
    return {"invalid_input": "input", "response_not_found": "previous_response_id"}.get(code)


@dataclass(frozen=True, slots=True)
class Accepted:
    steer_id: str
    response_id: str
    stream_id: str | None
    sequence_number: int


@dataclass(frozen=True, slots=True)
class SocketNote:
    """A steering event for a socket, and the lane it belongs on."""

    event: Json
    stream_id: str | None


@dataclass(frozen=True, slots=True)
class SteerOutcome:
    """What became of the steering queued for an ended response: a successor, or notes for its clients."""

    response_id: str
    steers: Sequence[Json]
    successor: str | None
    outcome: str | None
    required_input: Sequence[Json]
    sequence_number: int


def steer_items(value: Any) -> list[Json]:
    """The steering input as message items: a non-empty string, or a non-empty list of user messages whose content
    is a string or input_text / input_image / input_file parts (OpenAI's rules for `response.steer`)."""
    if isinstance(value, str) and value:
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value or len(value) > 64:
        raise SteerRefused("invalid_input")
    items = []
    for item in value:
        if not isinstance(item, dict) or item.get("role") != "user" or item.get("type", "message") != "message":
            raise SteerRefused("invalid_input", "Steering accepts only messages with the 'user' role.")
        if set(item) - {"type", "role", "content"}:
            raise SteerRefused("invalid_input", "A steering message may contain only 'type', 'role' and 'content'.")
        content = item.get("content")
        parts_ok = isinstance(content, list) and all(_part_ok(part) for part in content)
        if not (isinstance(content, str) and content) and not (parts_ok and content):
            raise SteerRefused(
                "invalid_input",
                "A steering message's content must be text, or input_text, input_image or input_file parts.",
            )
        items.append({"type": "message", "role": "user", "content": content})
    return items


def _part_ok(part: Any) -> bool:
    """A content part of steering input, shaped as the API takes it: text with its text, an image or a file with
    where it is."""
    if not isinstance(part, dict) or part.get("type") not in _STEER_PART_TYPES:
        return False
    if part["type"] == "input_text":
        return isinstance(part.get("text"), str) and bool(part["text"])
    sources = ("image_url", "file_id") if part["type"] == "input_image" else ("file_id", "file_data", "file_url")
    return any(isinstance(part.get(source), str) and part[source] for source in sources)


async def queue_steer(
    store: Store,
    response_id: Any,
    value: Any,
    *,
    tenant: str,
    max_pending: int,
    steerable: Callable[[str], bool] = lambda model: True,
) -> Accepted:
    """Store steering input for the tenant's running response; SteerRefused says why it cannot be. `steerable`
    says whether responses of a model can be steered at all."""
    if not isinstance(response_id, str) or not response_id or len(response_id) > 256:
        raise SteerRefused("invalid_input", "Missing required parameter: 'previous_response_id'.")
    items = steer_items(value)
    record = await store.get_response(response_id, tenant=tenant)
    if record is None or not record.stored or record.tenant != tenant:
        raise SteerRefused("response_not_found", f"Response with id '{response_id}' not found.")
    request = orjson.loads(record.request)
    stream_id = request.get("stream_id")
    if (
        request.get("conversation") is not None
        or request.get("context_management")
        or not steerable(str(request.get("model")))
    ):
        raise SteerRefused("steering_not_supported", stream_id=stream_id)
    if ResponseStatus(record.status) in TERMINAL:
        raise _ended(record.status, stream_id)
    steer_id = new_id("steer")
    queued = await store.queue_steer(
        response_id, orjson.dumps({"id": steer_id, "input": items}), max_pending=max_pending
    )
    if queued is SteerQueueOutcome.MISSING:
        raise SteerRefused("response_not_found", f"Response with id '{response_id}' not found.")
    if queued is SteerQueueOutcome.FULL:
        raise SteerRefused("too_many_pending_steers", stream_id=stream_id)
    if queued is SteerQueueOutcome.ENDED:
        ended = await store.get_response(response_id)
        raise _ended(ended.status if ended is not None else "completed", stream_id)
    return Accepted(steer_id, response_id, stream_id, record.last_sequence_number)


def _ended(status: str, stream_id: str | None) -> SteerRefused:
    code = "response_already_completed" if status == ResponseStatus.COMPLETED else "response_not_active"
    return SteerRefused(code, stream_id=stream_id)


def check_steer_event(event: dict[str, Any]) -> list[Json]:
    """The steering input of a `response.steer` event, as message items; SteerRefused when the event or its input
    is not one the API takes."""
    if set(event) - _STEER_EVENT_FIELDS:
        raise SteerRefused("invalid_input", "response.steer accepts only 'type', 'previous_response_id' and 'input'.")
    return steer_items(event.get("input"))


def accepted_note(steer_id: str, response_id: str, sequence_number: int) -> Json:
    return {
        "type": ACCEPTED,
        "sequence_number": sequence_number,
        "steer": {"id": steer_id, "previous_response_id": response_id},
    }


def refused_note(refusal: SteerRefused, event: dict[str, Any]) -> Json:
    """`response.steer.failed` for input refused before it was accepted (no steer id): the input given back."""
    previous = event.get("previous_response_id")
    return {
        "type": FAILED,
        "sequence_number": 0,
        "error": {"type": "invalid_request_error", "code": refusal.code, "message": refusal.message},
        "steer": {"input": event.get("input"), "previous_response_id": previous if isinstance(previous, str) else ""},
    }


async def steer_from_socket(
    store: Store,
    event: dict[str, Any],
    *,
    tenant: str,
    max_pending: int,
    steerable: Callable[[str], bool] = lambda model: True,
) -> SocketNote:
    """A `response.steer` client event's answer: `response.steer.accepted` once the input is stored, or
    `response.steer.failed` with the input given back."""
    try:
        check_steer_event(event)
        accepted = await queue_steer(
            store,
            event.get("previous_response_id"),
            event.get("input"),
            tenant=tenant,
            max_pending=max_pending,
            steerable=steerable,
        )
    except SteerRefused as refusal:
        return SocketNote(refused_note(refusal, event), refusal.stream_id)
    return SocketNote(
        accepted_note(accepted.steer_id, accepted.response_id, accepted.sequence_number), accepted.stream_id
    )


def required_input(output: Sequence[Any]) -> list[Json]:
    """Stubs of the inputs the client owes for the client-owned calls in a response's output."""
    stubs: list[Json] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "mcp_approval_request":
            stubs.append({"type": "mcp_approval_response", "approval_request_id": item.get("id")})
        elif item.get("type") in _REQUIRED_INPUT:
            kind, fields = _REQUIRED_INPUT[item["type"]]
            stubs.append({"type": kind, **{name: item.get(name) for name in fields}})
    return stubs


# -- after the end: a successor, or what became of the input ---------------------------------------------------


async def resolve_after_end(store: Store, record: ResponseRecord) -> None:
    """Resolve the steering queued for an ended response (idempotent: a settle repeated by a sweeper finds it
    resolved, or committed by the successor the first one made)."""
    response_id = record.response_id
    state = await store.steer_state(response_id)
    if not state.queued or state.successor is not None or state.outcome is not None:
        return
    status = ResponseStatus(record.status)
    if status not in (ResponseStatus.COMPLETED, ResponseStatus.INCOMPLETE):
        await store.resolve_steers(response_id, _FAILED_PREFIX + "response_not_active")
        return
    if required_input(orjson.loads(record.snapshot).get("output") or []):
        await store.resolve_steers(response_id, PENDING_OUTCOME)
        return
    try:
        request = CreateResponseRequest.model_validate_json(record.request)
    except ValidationError:
        await store.resolve_steers(response_id, _FAILED_PREFIX + "successor_creation_failed")
        return
    items = _queued_input(state)
    # The steered response's settings, continued from it with the queued input. Streamed as far as the stored
    # request says (nobody waits on a connection for it: a takeover must not fail it as unanswerable).
    successor = request.model_copy(update={"input": items, "previous_response_id": response_id, "stream": True})
    new, _ = new_response(successor, tenant=record.tenant, queued=True, shard=shard_of(response_id))
    try:
        await store.create_response(dataclasses.replace(new, takes_steers=(response_id, len(state.queued))))
    except SteersTaken:
        return  # committed (or resolved) by another settle meanwhile
    log.info("%s steered: its successor %s is queued", response_id, new.response_id)
    try:
        await store.announce_queued(new.response_id)
    except Exception as error:  # only a quick path: every instance's sweep finds it anyway
        log.warning("could not announce queued %s: %s", new.response_id, error)


async def pending_input(store: Store, response_id: str) -> tuple[list[Json], int]:
    """Steering input kept `pending` for a response that stopped for the client's tool outputs: the client's
    continuation of it gets this input first (and commits it). Empty when there is none."""
    state = await store.steer_state(response_id)
    if state.successor is not None or not state.queued:
        return [], 0
    if state.outcome is None:
        # Not resolved yet (its instance is settling it right now, or died first): it is pending all the same when
        # the response has ended waiting for tool outputs. Committing it is count-guarded, so it cannot go twice.
        record = await store.get_response(response_id)
        if record is None or ResponseStatus(record.status) not in (ResponseStatus.COMPLETED, ResponseStatus.INCOMPLETE):
            return [], 0
        if not required_input(orjson.loads(record.snapshot).get("output") or []):
            return [], 0
    elif state.outcome != PENDING_OUTCOME:
        return [], 0
    return _queued_input(state), len(state.queued)


def _queued_input(state: SteerState) -> list[Json]:
    """All the queued steering input, in submission order."""
    return [item for raw in state.queued for item in orjson.loads(raw)["input"]]


async def steering_summary(store: Store, response_id: str) -> Json:
    """What `GET /v1/responses/{id}/steering` shows: `status` (none, queued, committed, pending, failed), how much
    input is queued, the successor that committed it, and a failure's code."""
    state = await store.steer_state(response_id)
    status, _, code = (state.outcome or "").partition(":")
    if state.successor is not None:
        status = "committed"
    elif not status:
        status = "queued" if state.queued else "none"
    return {
        "object": "response.steering",
        "response_id": response_id,
        "status": status,
        "queued": len(state.queued) if state.successor is None else 0,
        "successor_response_id": state.successor,
        "error_code": code or None,
    }


async def outcome_of(store: Store, response_id: str) -> SteerOutcome | None:
    """For a follower that has seen the response's terminal event: None when no steering was queued for it, else
    once it is resolved, what became of it (waiting, with short pauses, for the settle that resolves it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESOLVE_WAIT_SECONDS
    delay = 0.005
    while True:
        state = await store.steer_state(response_id)
        if not state.queued and state.successor is None:
            return None
        if state.successor is not None or state.outcome is not None:
            break
        if loop.time() >= deadline:
            log.warning("steering of %s not resolved after %.0fs", response_id, RESOLVE_WAIT_SECONDS)
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)
    record = await store.get_response(response_id)
    output = orjson.loads(record.snapshot).get("output") or [] if record is not None else []
    return SteerOutcome(
        response_id=response_id,
        steers=[orjson.loads(raw) for raw in state.queued],
        successor=state.successor,
        outcome=state.outcome,
        required_input=required_input(output),
        sequence_number=record.last_sequence_number if record is not None else 0,
    )


def notes_for_clients(outcome: SteerOutcome) -> list[Json]:
    """The socket events that tell what became of steering input that no successor committed."""
    if outcome.successor is not None or outcome.outcome is None:
        return []
    notes = []
    for steer in outcome.steers:
        ids = {"id": steer["id"], "previous_response_id": outcome.response_id}
        if outcome.outcome == PENDING_OUTCOME:
            notes.append(
                {
                    "type": PENDING,
                    "sequence_number": outcome.sequence_number,
                    "steer": ids,
                    "reason": "waiting_for_required_input",
                    "required_input": list(outcome.required_input),
                }
            )
        else:
            code = outcome.outcome.removeprefix(_FAILED_PREFIX)
            notes.append(
                {
                    "type": FAILED,
                    "sequence_number": outcome.sequence_number,
                    "error": {"type": "invalid_request_error", "code": code, "message": _MESSAGES.get(code, code)},
                    "steer": {**ids, "input": steer["input"]},
                }
            )
    return notes
