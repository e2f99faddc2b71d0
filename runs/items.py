"""Conversation items: giving input items stable ids, and turning stored history back into model input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runs.errors import InvalidRequest
from runs.ids import new_item_id

Json = dict[str, Any]

_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
# Tool items that OpenAI lists with a status (`input_items`, conversation items), whatever the client sent.
_LISTED_WITH_STATUS = frozenset(
    {
        "function_call",
        "function_call_output",
        "custom_tool_call",
        "custom_tool_call_output",
        "computer_call",
        "computer_call_output",
        "local_shell_call",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "web_search_call",
        "file_search_call",
        "image_generation_call",
        "code_interpreter_call",
    }
)


def normalise_items(raw: str | list[Json] | None) -> list[Json]:
    """Items with a type, list content and a stable id, the way `input_items` and conversations list them. A
    string is one user message."""
    if raw is None:
        return []
    # Shallow copies: only top-level fields are set or replaced below, never nested values changed.
    source: list[Json] = (
        [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else [dict(item) for item in raw]
    )
    items = []
    for item in source:
        item.setdefault("type", "message")
        if item["type"] == "message" and isinstance(item.get("content"), str):
            if item.get("role") == "assistant":
                item["content"] = [{"type": "output_text", "text": item["content"], "annotations": []}]
            else:
                item["content"] = [{"type": "input_text", "text": item["content"]}]
        elif item["type"] == "message" and isinstance(item.get("content"), list):
            # An output text part is listed with its annotations (OpenAI's schema requires them), none when sent.
            item["content"] = [
                {**part, "annotations": []}
                if isinstance(part, dict) and part.get("type") == "output_text" and "annotations" not in part
                else part
                for part in item["content"]
            ]
        if "id" not in item:
            item["id"] = new_item_id(_ID_PREFIXES.get(item["type"], "item"))
        if item["type"] in _LISTED_WITH_STATUS and item.get("status") is None:
            item["status"] = "completed"
        items.append(item)
    return items


# The string fields the gateway itself reads from each kind of item (to list it, to store it in a conversation,
# to turn history back into model input); anything else in an item is the provider's to judge.
_REQUIRED_STRINGS = {
    "function_call": ("call_id", "name", "arguments"),
    "custom_tool_call": ("call_id", "name", "input"),
    "function_call_output": ("call_id",),
    "custom_tool_call_output": ("call_id",),
    "compaction": ("encrypted_content",),
}


# An item's id names it in a conversation's store (a hash field) and in every listing; OpenAI's are ~50 characters.
MAX_ID_LENGTH = 256
MAX_TYPE_LENGTH = 64


def check_input_items(items: Sequence[Any], param: str = "input") -> None:
    """Each item has the shape the gateway relies on when it stores, lists or replays it: a 400 naming the
    first one that does not, before anything is stored (an odd item stored once would break every later turn)."""
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        kind = item.get("type", "message")
        if not isinstance(kind, str) or len(kind) > MAX_TYPE_LENGTH:
            raise InvalidRequest(
                f"Input item type must be a string of at most {MAX_TYPE_LENGTH} characters.", param=f"{where}.type"
            )
        if "id" in item and (not isinstance(item["id"], str) or not 0 < len(item["id"]) <= MAX_ID_LENGTH):
            raise InvalidRequest(
                f"Input item id must be a string of 1 to {MAX_ID_LENGTH} characters.", param=f"{where}.id"
            )
        if kind == "message":
            if "role" not in item:
                raise InvalidRequest(
                    "Missing required parameter: 'role'.", param=f"{where}.role", code="missing_required_parameter"
                )
            if not isinstance(item["role"], str):
                raise InvalidRequest("Message role must be a string.", param=f"{where}.role")
            content = item.get("content")
            parts_typed = isinstance(content, list) and all(
                isinstance(part, dict) and isinstance(part.get("type"), str) for part in content
            )
            if not (isinstance(content, str) or parts_typed):
                raise InvalidRequest(
                    "Message content must be a string or a list of content parts, each with a type.",
                    param=f"{where}.content",
                )
        for name in _REQUIRED_STRINGS.get(kind, ()):
            if not isinstance(item.get(name), str):
                raise InvalidRequest(f"'{name}' must be a string.", param=f"{where}.{name}")
        if kind in _ANSWERED_CALL and not isinstance(item.get("output"), (str, list)):
            raise InvalidRequest("Tool output must be a string or a list of content parts.", param=f"{where}.output")


# Each kind of tool output a client sends, and the kind of call it answers.
_ANSWERED_CALL = {"function_call_output": "function_call", "custom_tool_call_output": "custom_tool_call"}


def check_tool_outputs(items: Sequence[Any], history: Sequence[Json] = ()) -> None:
    """Every tool output in `items` (a request's input) answers a call made in `history` or in the input itself,
    as OpenAI checks; otherwise a 400 naming the output, before anything is stored or sent."""
    calls = {
        (item.get("type"), item.get("call_id"))
        for item in (*history, *items)
        if isinstance(item, dict) and item.get("type") in _ANSWERED_CALL.values()
    }
    for index, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type") not in _ANSWERED_CALL:
            continue
        call_id = item.get("call_id")
        if (_ANSWERED_CALL[item["type"]], call_id) not in calls:
            raise InvalidRequest(
                f"No tool call found for {item['type'].replace('_', ' ')} with call_id {call_id}.",
                param=f"input[{index}].call_id",
            )


def stored_in_conversation(items: list[Json]) -> list[Json]:
    """Items as a conversation keeps them: a message always has a status, as the API lists it."""
    return [
        {**item, "status": item.get("status") or "completed"} if item["type"] == "message" else item for item in items
    ]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content or [] if isinstance(part, dict))


def as_model_input(items: list[Json]) -> list[Json]:
    """Stored history as input a provider will take without state of its own: no gateway ids (a provider with
    `store=false` would look them up and fail), no statuses, earlier answers as plain assistant text, and no
    reasoning that cannot be sent back (only encrypted reasoning can)."""
    converted: list[Json] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") == "assistant":
                converted.append({"role": "assistant", "content": _text(item.get("content"))})
            else:
                converted.append({"role": item.get("role", "user"), "content": item.get("content", "")})
        elif kind == "function_call":
            call = {
                "type": "function_call",
                "call_id": item["call_id"],
                "name": item["name"],
                "arguments": item["arguments"],
            }
            if item.get("namespace"):
                call["namespace"] = item["namespace"]  # a namespace tool's function: the name alone is not enough
            converted.append(call)
        elif kind == "function_call_output":
            converted.append({"type": "function_call_output", "call_id": item["call_id"], "output": item["output"]})
        elif kind == "reasoning":
            if item.get("encrypted_content"):
                converted.append({key: value for key, value in item.items() if key != "status"})
        else:
            converted.append({key: value for key, value in item.items() if key not in ("id", "status")})
    return converted
