"""Object ids: a type prefix and 128 random bits, so ids can't be guessed or enumerated."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """`<prefix>_<32 hex digits>`, e.g. `resp_9f…`."""
    return f"{prefix}_{secrets.token_hex(16)}"


def new_response_id() -> str:
    """A fresh Response id."""
    return new_id("resp")


def new_item_id(prefix: str = "msg") -> str:
    """A fresh id for an input or output item."""
    return new_id(prefix)
