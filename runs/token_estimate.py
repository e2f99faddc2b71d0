"""The gateway's own estimate of how many tokens a request's input is, for where no provider counts it."""

from __future__ import annotations

import math
from typing import Any

import orjson

# About four characters of English text per token, as OpenAI's tokenizer guidance puts it.
CHARACTERS_PER_TOKEN = 4


def estimate_tokens(body: dict[str, Any]) -> int:
    """The tokens of what the model reads of a Responses body (instructions, input, tools): its JSON's
    characters over `CHARACTERS_PER_TOKEN`."""
    read = {key: body.get(key) for key in ("instructions", "input", "tools") if body.get(key) is not None}
    return math.ceil(len(orjson.dumps(read).decode()) / CHARACTERS_PER_TOKEN)
