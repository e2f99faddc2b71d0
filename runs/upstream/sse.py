"""Splitting a provider's server-sent-event byte stream into (event name, data) pairs, chunk by chunk."""

from __future__ import annotations

# One leading byte-order mark is not part of the stream (WHATWG event-stream interpretation).
_BOM = b"\xef\xbb\xbf"
# The end of stream sentinel OpenAI-compatible servers send; like the openai SDK, any data starting with it.
DONE_SENTINEL = b"[DONE]"

SSEEvent = tuple[bytes, bytes]


class SSESplitter:
    """Feed it the body's chunks as they arrive, cut anywhere; it returns each complete event's name (b"" when the
    event has no `event:` field) and its data (`data:` lines joined with a newline). Events without data are not
    dispatched, as the WHATWG parser does; `id:`, `retry:` and unknown fields are ignored; an event cut off by the
    end of the body is dropped. After `data: [DONE]` it is `done` and returns nothing more.

    Line endings are normalised to `\\n` per chunk with `bytes.replace`, then events are cut at `\\n\\n` with
    `bytes.find`, so the common event (`data: …` or `event: …` then `data: …`) costs a few C calls, not a Python
    loop over lines or characters."""

    __slots__ = ("_head", "_pending", "_scanned", "_skip_lf", "_started", "done")

    def __init__(self) -> None:
        self._head = b""  # the first bytes, held until we know whether they start with a BOM
        self._started = False
        self._skip_lf = False  # the last chunk ended in `\r`: a `\n` starting the next one belongs to it
        self._pending = bytearray()  # the start of an event not yet terminated
        self._scanned = 0  # where in `_pending` a terminator could still start
        self.done = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events this chunk completes, in order."""
        if self.done or not chunk:
            return []
        if not self._started:
            chunk = self._strip_bom(chunk)
            if not chunk:
                return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\r" in chunk:
            self._skip_lf = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._pending:
            pending = self._pending
            pending += chunk
            if pending.find(b"\n\n", self._scanned) < 0:
                self._scanned = len(pending) - 1
                return []
            buffer = bytes(pending)
            pending.clear()
        else:
            buffer = chunk
        return self._split(buffer)

    def _strip_bom(self, chunk: bytes) -> bytes:
        head = self._head + chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._head = head
            return b""
        self._started = True
        self._head = b""
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _split(self, buffer: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        start = 0
        size = len(buffer)
        # Chunks usually end on an event's end: stop there rather than search the empty rest.
        while start < size and (end := buffer.find(b"\n\n", start)) >= 0:
            event = _parse_event(buffer, start, end)
            start = end + 2
            if event is None:
                continue
            if event[1].startswith(DONE_SENTINEL):
                self.done = True
                return events
            events.append(event)
        if start < size:
            self._pending += memoryview(buffer)[start:]
            self._scanned = max(len(self._pending) - 1, 0)
        return events


def _parse_event(buffer: bytes, start: int, end: int) -> SSEEvent | None:
    """The event in `buffer[start:end]` (lines separated by single `\\n`s), or None when it carries no data."""
    newline = buffer.find(b"\n", start, end)
    if newline < 0:
        if buffer.startswith(b"data: ", start, end):
            return (b"", buffer[start + 6 : end]) if end > start + 6 else None
    elif (
        buffer.startswith(b"event: ", start, newline)
        and buffer.startswith(b"data: ", newline + 1, end)
        and buffer.find(b"\n", newline + 1, end) < 0
    ):
        return (buffer[start + 7 : newline], buffer[newline + 7 : end]) if end > newline + 7 else None
    return _parse_lines(buffer[start:end])


def _parse_lines(block: bytes) -> SSEEvent | None:
    """The general case, field by field: comments, several data lines, no space after the colon, other fields."""
    name = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # a blank line before the event, or a `:` comment
            continue
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    if not data:
        return None
    joined = b"\n".join(data)
    return (name, joined) if joined else None
