"""The simulator's ``POST /v1/responses/compact``: a conversation compacted the way OpenAI compacts one.

The answer (a ``response.compaction`` object) keeps every user message of the input verbatim and folds the
rest into one ``compaction`` item whose ``encrypted_content`` is opaque to clients but readable by the
simulator: a short deterministic summary (``SUMMARY_TOKENS`` words seeded by the whole input). Sent back as
input, the item counts as that summary's text (see ``simulator.text.input_text_of``), in usage and in what the
answer is seeded by. ``previous_response_id`` is refused, as the simulator stores nothing to look it up in.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from simulator.plan import _RequestError, json_route
from simulator.text import encrypted_compaction, input_text_of, simulated_text, token_count

SUMMARY_TOKENS = 12

Json = dict[str, Any]


async def compact_response(request: web.Request) -> web.Response:
    """``POST /v1/responses/compact``; registered by ``simulator.server.create_simulator_app``."""
    return await json_route(request, _compact)


def check_stateless_input(body: Mapping[str, Any], stateful: tuple[str, ...]) -> None:
    """Refuse what only a stateful server can answer, and an ``input``/``instructions`` of the wrong kind."""
    for name in stateful:
        if body.get(name) is not None:
            message = f"{name} is not supported by the simulator, which stores nothing; send the whole input."
            raise _RequestError(400, message, param=name, code="unsupported_parameter")
    input_ = body.get("input")
    if input_ is not None and not isinstance(input_, (str, list)):
        raise _RequestError(400, "input must be a string or an array of input items.", param="input")
    for index, item in enumerate(input_ if isinstance(input_, list) else ()):
        if not isinstance(item, Mapping):
            raise _RequestError(400, "Each input item must be an object.", param=f"input[{index}]")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise _RequestError(400, "instructions must be a string.", param="instructions")


async def _compact(request: web.Request, body: dict[str, Any]) -> Json:
    check_stateless_input(body, ("previous_response_id",))
    input_ = body.get("input")
    if input_ is None:
        raise _RequestError(400, "Missing required parameter: 'input'.", param="input")
    input_text = input_text_of(body)
    summary = "".join(simulated_text("compaction\n" + input_text, SUMMARY_TOKENS))
    compaction = {
        "id": f"cmpitem_{uuid.uuid4().hex}",
        "type": "compaction",
        "encrypted_content": encrypted_compaction(summary),
    }
    input_tokens, output_tokens = token_count(input_text), token_count(summary)
    return {
        "id": f"cmp_{uuid.uuid4().hex}",
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [*_user_messages(input_), compaction],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _user_messages(input_: str | list[Any]) -> list[Json]:
    """The input's user messages as items, the way OpenAI lists them in a compaction's output."""
    items: list[Any] = [{"role": "user", "content": input_}] if isinstance(input_, str) else input_
    messages: list[Json] = []
    for item in items:
        if item.get("role") != "user" or item.get("type", "message") != "message":
            continue
        content = item.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        messages.append(
            {
                "id": item.get("id") or f"msg_{uuid.uuid4().hex}",
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": parts,
            }
        )
    return messages
