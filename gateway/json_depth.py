"""How deep a client's JSON may nest: bounded once, where it is parsed (an HTTP body, a WebSocket message), since
every later step (validation, serialisation, folding, the provider's body) recurses through it."""

from __future__ import annotations

from typing import Any

# Far more than any SDK body needs (a tool's JSON schema included), far less than what breaks a recursive step
# later (orjson serialises at most 254 levels).
MAX_JSON_DEPTH = 64


def nesting_depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a scalar is 0), without recursion: every later
    step (validation, folding, the provider's body) recurses, so depth is bounded once, here."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth  # deep enough to refuse: no need to walk the rest
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest
