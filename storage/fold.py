"""The stored Response is the fold of its stored events: how each event changes a Response snapshot.

The store writes a snapshot only now and then (at status changes, and once enough bytes of
events have followed the last one), and folds the events after it when a reader asks for the response, so the
definition lives here, beside the data it defines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

Json = dict[str, Any]

LIFECYCLE_EVENT_TYPES = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.failed",
        "response.incomplete",
    }
)


_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.reasoning_text.delta"})


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value: an item or part kept in the snapshot must not share the event's objects.
    Through orjson it costs a tenth of `copy.deepcopy`, which is made for arbitrary objects."""
    return orjson.loads(orjson.dumps(value))


def _slot(items: list[Any], index: int) -> None:
    """Grow `items` so that `index` is valid (events may name an index the list has not reached yet)."""
    while len(items) <= index:
        items.append({})


def _item(snapshot: Json, event: Json) -> Json:
    output: list[Json] = snapshot.setdefault("output", [])
    index = int(event.get("output_index", 0))
    _slot(output, index)
    return output[index]


def _part(snapshot: Json, event: Json, field: str = "content", index_key: str = "content_index") -> Json:
    try:  # the part is there (for every event but a stray one): one lookup, not the three calls below
        found: Json = snapshot["output"][event["output_index"]][field][event[index_key]]
        return found
    except (KeyError, IndexError, TypeError):  # make room for an index skipped, with defaults and int()s
        pass
    parts: list[Json] = _item(snapshot, event).setdefault(field, [])
    index = int(event.get(index_key, 0))
    _slot(parts, index)
    return parts[index]


def _as_part_logprob(entry: Any) -> Any:
    """A delta event's logprob as an output text part holds it: with the token's UTF-8 `bytes` (events carry
    none; the part's schema requires them), so a snapshot read mid-stream is as valid as the finished one."""
    if not isinstance(entry, dict):
        return entry
    tops = entry.get("top_logprobs") or []
    return {
        "token": entry.get("token", ""),
        "bytes": list(str(entry.get("token", "")).encode()),
        "logprob": entry.get("logprob", 0.0),
        "top_logprobs": [
            {
                "token": top.get("token", ""),
                "bytes": list(str(top.get("token", "")).encode()),
                "logprob": top.get("logprob", 0.0),
            }
            for top in tops
            if isinstance(top, dict)
        ],
    }


def apply_event(snapshot: Json, event: Json) -> Json:
    """Return the snapshot after `event`. Lifecycle events replace it (a shallow copy of the event's response: the
    caller hands the event over and does not change it afterwards); output events edit it in place; events that do
    not change the Response (unknown ones included) leave it as it is.

    This is the one definition of "the snapshot equals the result of applying the stored events": the run writes
    what this returns, and tests replay stored logs through it. Indices an upstream skipped are filled with empty
    objects rather than refused, so one odd event cannot stop a run.
    """
    kind = event["type"]
    if kind in _TEXT_DELTAS:  # first: nearly every event is one
        part = _part(snapshot, event)
        part["text"] = part.get("text", "") + event["delta"]
        if event.get("logprobs") and "logprobs" in part:
            part["logprobs"] = [*(part["logprobs"] or []), *(_as_part_logprob(entry) for entry in event["logprobs"])]
        return snapshot
    if kind in LIFECYCLE_EVENT_TYPES:
        return dict(event["response"])
    if kind in ("response.output_item.added", "response.output_item.done"):
        output: list[Json] = snapshot.setdefault("output", [])
        index = int(event["output_index"])
        _slot(output, index)
        output[index] = _copy(event["item"])
    elif kind in ("response.content_part.added", "response.content_part.done"):
        parts: list[Json] = _item(snapshot, event).setdefault("content", [])
        index = int(event["content_index"])
        _slot(parts, index)
        parts[index] = _copy(event["part"])
    elif kind in ("response.output_text.done", "response.reasoning_text.done"):
        _part(snapshot, event)["text"] = event["text"]
    elif kind == "response.refusal.delta":
        part = _part(snapshot, event)
        part["refusal"] = part.get("refusal", "") + event["delta"]
    elif kind == "response.refusal.done":
        _part(snapshot, event)["refusal"] = event["refusal"]
    elif kind == "response.function_call_arguments.delta":
        item = _item(snapshot, event)
        item["arguments"] = item.get("arguments", "") + event["delta"]
    elif kind == "response.function_call_arguments.done":
        _item(snapshot, event)["arguments"] = event["arguments"]
    elif kind in ("response.reasoning_summary_part.added", "response.reasoning_summary_part.done"):
        summary: list[Json] = _item(snapshot, event).setdefault("summary", [])
        index = int(event["summary_index"])
        _slot(summary, index)
        summary[index] = _copy(event["part"])
    elif kind == "response.reasoning_summary_text.delta":
        part = _part(snapshot, event, "summary", "summary_index")
        part["text"] = part.get("text", "") + event["delta"]
    elif kind == "response.reasoning_summary_text.done":
        _part(snapshot, event, "summary", "summary_index")["text"] = event["text"]
    return snapshot


def fold_events(snapshot: bytes, events: Iterable[bytes]) -> bytes:
    """The snapshot after the stored events (their JSON, in order) that follow it."""
    current: Json = orjson.loads(snapshot)
    for data in events:
        current = apply_event(current, orjson.loads(data))
    return orjson.dumps(current)
