"""The simulated model's text: the deterministic answer words, the input text seeding them, and token counting."""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
from collections.abc import Mapping
from typing import Any

VOCABULARY = (
    "the", "a", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "runs", "to",
    "river", "under", "bright", "blue", "sky", "while", "small", "birds", "sing", "in", "green", "trees",
    "near", "old", "stone", "bridge", "where", "children", "play", "with", "red", "kites", "every", "warm",
    "summer", "day", "as", "soft", "wind", "moves", "tall", "grass", "across", "quiet", "hills", "far",
    "away",
)  # fmt: skip

# Token ids are hashes of words into a vocabulary this big, like a real tokenizer's ids.
TOKEN_ID_SPACE = 32_000
# Marks compaction content the simulator made, so foreign (really encrypted) content is told apart.
_COMPACTION_PREFIX = "sim-compaction-v1:"


def simulated_text(input_text: str, tokens: int) -> list[str]:
    """The deterministic tokens answering ``input_text``; ``"".join(...)`` is the full text."""
    rng = random.Random(int.from_bytes(hashlib.sha256(input_text.encode()).digest(), "big"))
    words = [rng.choice(VOCABULARY) for _ in range(tokens)]
    if not words:
        return []
    out = [words[0].capitalize()] + [" " + word for word in words[1:]]
    out[-1] += "."
    return out


def encrypted_compaction(summary: str) -> str:
    """The opaque ``encrypted_content`` of a compaction item carrying ``summary``."""
    return base64.urlsafe_b64encode((_COMPACTION_PREFIX + summary).encode()).decode()


def compaction_summary(encrypted_content: Any) -> str | None:
    """The summary inside ``encrypted_content``, or None when the simulator did not make it."""
    if not isinstance(encrypted_content, str):
        return None
    try:
        decoded = base64.urlsafe_b64decode(encrypted_content.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return decoded.removeprefix(_COMPACTION_PREFIX) if decoded.startswith(_COMPACTION_PREFIX) else None


def input_text_of(body: Mapping[str, Any]) -> str:
    """Flatten ``instructions`` and ``input`` (a string or message items) into the text seeding the answer.

    A ``compaction`` item stands for the conversation it replaced, so its summary counts as input text.
    """
    pieces: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        pieces.append(instructions)
    input_ = body.get("input")
    if isinstance(input_, str):
        pieces.append(input_)
    elif isinstance(input_, list):
        for item in input_:
            if not isinstance(item, Mapping):
                continue
            if item.get("type") == "compaction":
                summary = compaction_summary(item.get("encrypted_content"))
                if summary is not None:
                    pieces.append(summary)
                continue
            content = item.get("content")
            if isinstance(content, str):
                pieces.append(content)
            elif isinstance(content, list):
                pieces.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, Mapping)
                    and part.get("type") in ("input_text", "output_text")
                    and isinstance(part.get("text"), str)
                )
    return "\n".join(pieces)


def chat_input_text_of(body: Mapping[str, Any]) -> str:
    """Flatten chat ``messages`` into the text seeding the answer, equal to ``input_text_of`` of the same
    conversation as a Responses request (``instructions`` <-> a leading system message).

    The pieces mirror ``input_text_of`` exactly, since the gateway expects the same text from either provider
    kind: every message in order (system included) gives its string content as one piece (even ``""``, as an
    input item would) or each ``text`` part of a part list as its own piece (not concatenated: input_text_of
    keeps parts apart). A tool-call turn (role ``tool``, or ``tool_calls`` set) adds nothing when its content
    is empty, since its Responses twin (a ``function_call`` item) has no content at all.
    """
    pieces: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            if content or not (message.get("role") == "tool" or message.get("tool_calls")):
                pieces.append(content)
        elif isinstance(content, list):
            pieces.extend(
                part["text"]
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
            )
    return "\n".join(pieces)


def token_count(text: str) -> int:
    """How many tokens ``text`` is: the one count behind every usage figure and counting route."""
    return len(text.split())


def token_ids(text: str) -> list[int]:
    """One stable id per token of ``text`` (``len(token_ids(t)) == token_count(t)``), as ``/tokenize`` lists them."""
    return [int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % TOKEN_ID_SPACE for word in text.split()]
