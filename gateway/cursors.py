"""What a client's cursor may be (`starting_after`, `Last-Event-ID`, a WebSocket resume): a sequence number or an
epoch as ASCII digits that fit a stream entry id's 64-bit halves. One rule for every way a client names one."""

from __future__ import annotations

MAX_CURSOR_DIGITS = 18


def is_cursor_part(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= MAX_CURSOR_DIGITS
