"""WebSocket mode's frames: the client events it takes, the checks on their fields, and the server frames it
sends (a stored event on a lane, an `error` event). gateway/websocket.py runs the socket."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.cursors import is_cursor_part
from runs.errors import ApiError, InvalidRequest
from runs.items import Json

CREATE = "response.create"
STEER = "response.steer"
# The gateway's own client event (README, "WebSocket mode"): resume a response's events after a cursor.
RESUME = "response.resume"

# How many responses one handshake's `resume` parameter may name.
MAX_RESUMES = 64
# OpenAI's rule for a lane's name.
_STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,256}")


@dataclass(frozen=True, slots=True)
class Resume:
    """Follow `response_id`'s events after the event numbered `after` (-1: from the first)."""

    response_id: str
    after: int


def parse_cursor(value: Any, param: str) -> int:
    """A `starting_after`: an integer from 0 (digits, in a string or a JSON number) below 2^63."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not is_cursor_part(text):
        raise InvalidRequest(f"'{param}' must be a sequence number (an integer from 0).", param=param)
    return int(text)


def parse_resume_query(values: Sequence[str]) -> list[Resume]:
    """`resume=<response id>[:<sequence number>]`, comma-separated or repeated: the responses a (re)connecting
    client follows on the new socket, after the event it last received (from the first one without a number)."""
    resumes = []
    for value in values:
        for part in value.split(","):
            if not part:
                continue
            response_id, colon, cursor = part.partition(":")
            if not response_id or len(response_id) > 256:
                raise InvalidRequest("Each 'resume' entry must be '<response id>[:<sequence number>]'.", param="resume")
            resumes.append(Resume(response_id, parse_cursor(cursor, "resume") if colon else -1))
    if len(resumes) > MAX_RESUMES:
        raise InvalidRequest(f"'resume' may name at most {MAX_RESUMES} responses.", param="resume")
    return resumes


def with_lane(data: bytes, stream_id: str | None) -> bytes:
    """A stored event's JSON with the lane's `stream_id` added (the stored bytes end with the object's `}`)."""
    if stream_id is None:
        return data
    return data[:-1] + b',"stream_id":' + orjson.dumps(stream_id) + b"}"


def error_event(error: ApiError, stream_id: str | None = None) -> bytes:
    """The `error` event the SDK parses (`ResponseWsError`): the HTTP status it stands for and the usual body."""
    event: Json = {"type": "error", "status": error.status, **error.envelope()}
    if error.headers:
        event["error"]["headers"] = error.headers
    if stream_id is not None:
        event["stream_id"] = stream_id
    return orjson.dumps(event)


def has_lane(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and isinstance(event.get("stream_id"), str)
        and bool(_STREAM_ID.fullmatch(event["stream_id"]))
    )


def stream_id_of(event: dict[str, Any]) -> str | None:
    stream_id = event.get("stream_id")
    if stream_id is None:
        return None
    if not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id):
        raise InvalidRequest(
            "The 'stream_id' field must be a non-empty string with at most 256 characters and may only contain "
            "letters, numbers, underscores, hyphens, and periods.",
            param="stream_id",
            code="invalid_stream_id",
        )
    return stream_id
