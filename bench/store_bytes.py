"""(e) The embedded store's bytes per event: responses written into a `MemoryStore` in this process the way the
gateway writes them (admission, then the run's `EventLog` fed with parsed upstream events), the memory the store
keeps accounted with tracemalloc. Deterministic memory accounting, not timing: no process, no network."""

from __future__ import annotations

import asyncio
import gc
import linecache
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from runs.admission import new_response
from runs.event_log import EventLog
from runs.request import CreateResponseRequest
from runs.run import emit_terminal
from runs.status import STATUS_EVENT_TYPE, ResponseStatus
from simulator.server import simulated_text
from storage.base import StoredEvent
from storage.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
OWNER = "bench-store-bytes"
# Longer than the measurement: the store refuses a snapshot from an expired lease.
LEASE_MS = 3_600_000
RETENTION_SECONDS = 86_400  # the gateway's default storage.retention_seconds
# Events a run emits between two waits for the upstream's next chunk; its log's writer appends them meanwhile.
EVENTS_PER_CHUNK = 16
TOP_LINES = 8
DELTA_SAMPLE = 1_000  # text deltas serialised for the trimmed / untrimmed comparison


@dataclass(frozen=True)
class RetainedLine:
    """Memory the store kept that was allocated on one source line (tracemalloc, one frame)."""

    where: str  # path:line, relative to the repository
    code: str
    size: int
    count: int


@dataclass
class StoreBytesResult:
    responses: int
    deltas: int  # text deltas emitted, all responses
    events: int = 0  # events the store holds at the end (framing and lifecycle events included)
    retained_bytes: int = 0  # traced memory after the responses are written minus before the store existed
    json_bytes: int = 0  # sum of the stored events' `len(data)`
    delta_untrimmed_bytes: float | None = None  # memory an `orjson.dumps` result of a text delta holds, as returned
    delta_trimmed_bytes: float | None = None  # the same, copied to its size as the embedded store keeps it
    delta_json_bytes: float | None = None  # mean len() of those serialised deltas
    lines: list[RetainedLine] = field(default_factory=list)  # where the retained memory was allocated, largest first
    seconds: float = 0.0

    @property
    def retained_per_event(self) -> float | None:
        return self.retained_bytes / self.events if self.events else None

    @property
    def json_per_event(self) -> float | None:
        return self.json_bytes / self.events if self.events else None

    @property
    def overhead_per_event(self) -> float | None:
        """Retained bytes beyond the events' own JSON, per stored event: the price of keeping them in Python."""
        return (self.retained_bytes - self.json_bytes) / self.events if self.events else None


def plan(events: int, tokens: int) -> list[int]:
    """Text deltas per response: `events` of them in responses of `tokens` (the last one shorter)."""
    tokens = max(tokens, 1)
    full, rest = divmod(max(events, 1), tokens)
    return [tokens] * full + ([rest] if rest else [])


def _request(label: str, tokens: int) -> CreateResponseRequest:
    body = {
        "model": "sim-1",
        "input": label,
        "metadata": {"sim_tokens": str(tokens), "sim_token_delay_ms": "0", "sim_ttft_ms": "0"},
        "stream": True,
        "background": True,
    }
    return CreateResponseRequest.model_validate_json(orjson.dumps(body))


def upstream_events(label: str, item_id: str, tokens: int) -> Iterator[bytes]:
    """The JSON of the events the simulator streams between its lifecycle events (which the run does not store):
    the item and part opening, one text delta per token, the done events; then its `response.completed`."""
    text = simulated_text(label, tokens)
    in_part = {"item_id": item_id, "output_index": 0, "content_index": 0}
    message = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant"}
    part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    number = 2  # after the simulator's own created and in_progress
    opening = [
        {"type": "response.output_item.added", "output_index": 0, "item": {**message, "content": []}},
        {"type": "response.content_part.added", **in_part, "part": part},
    ]
    for event in opening:
        yield orjson.dumps({**event, "sequence_number": number})
        number += 1
    for token in text:
        delta = {"type": "response.output_text.delta", **in_part, "delta": token, "logprobs": []}
        yield orjson.dumps({**delta, "sequence_number": number})
        number += 1
    part = {**part, "text": "".join(text)}
    item = {**message, "status": "completed", "content": [part]}
    closing = [
        {"type": "response.output_text.done", **in_part, "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", **in_part, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
    ]
    for event in closing:
        yield orjson.dumps({**event, "sequence_number": number})
        number += 1
    usage = {
        "input_tokens": len(label.split()),
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len(label.split()) + tokens,
    }
    completed = {"type": "response.completed", "response": {"status": "completed", "output": [item], "usage": usage}}
    yield orjson.dumps({**completed, "sequence_number": number})


async def write_response(store: MemoryStore, index: int, tokens: int) -> str:
    """One background response as the gateway writes it: admitted (created), run (in_progress), the upstream's
    events parsed from their bytes (so each keeps strings of its own, as in the gateway), the terminal event.
    Returns its id."""
    label = f"bench store bytes {index}"
    new, snapshot = new_response(_request(label, tokens), owner=OWNER, lease_ms=LEASE_MS)
    lease = await store.create_response(new)
    assert lease is not None
    log = EventLog(store, new.response_id, snapshot, next_sequence_number=len(new.events), lease=lease)
    try:
        # As Run._advance: the run takes its queued background response to in_progress first.
        status = ResponseStatus.IN_PROGRESS
        await log.emit({"type": STATUS_EVENT_TYPE[status], "response": {**log.snapshot, "status": status.value}})
        await log.flush()
        for emitted, data in enumerate(upstream_events(label, f"msg_{index:032x}", tokens), start=1):
            event = orjson.loads(data)  # as the upstream client parses it (runs/upstream/client.py)
            if event["type"] == "response.completed":
                upstream = event["response"]
                await emit_terminal(log, ResponseStatus.COMPLETED, output=upstream["output"], usage=upstream["usage"])
                break
            await log.emit(event)
            if emitted % EVENTS_PER_CHUNK == 0:
                await asyncio.sleep(0)
    finally:
        await log.close()
    return new.response_id


def _delta_sample(count: int) -> list[dict[str, Any]]:
    label = "bench store bytes sample"
    events = [orjson.loads(data) for data in upstream_events(label, "msg_" + "0" * 32, count)]
    return [event for event in events if event["type"] == "response.output_text.delta"]


def _measure_trimming(result: StoreBytesResult) -> None:
    """What trimming saves on a text delta: the memory an `orjson.dumps` result holds as returned, and as copied to
    its size (what the embedded store keeps). Needs tracemalloc running."""
    sample = _delta_sample(DELTA_SAMPLE)
    kept: list[bytes] = [b""] * len(sample)  # allocated up front: only the bytes objects are counted
    gc.collect()
    start = tracemalloc.get_traced_memory()[0]
    for index, event in enumerate(sample):
        kept[index] = orjson.dumps(event)
    result.delta_untrimmed_bytes = (tracemalloc.get_traced_memory()[0] - start) / len(sample)
    result.delta_json_bytes = sum(map(len, kept)) / len(sample)
    kept = [b""] * len(sample)
    gc.collect()
    start = tracemalloc.get_traced_memory()[0]
    for index, event in enumerate(sample):
        kept[index] = memoryview(orjson.dumps(event)).tobytes()
    result.delta_trimmed_bytes = (tracemalloc.get_traced_memory()[0] - start) / len(sample)


def _where(filename: str, lineno: int) -> tuple[str, str]:
    path = Path(filename)
    shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return f"{shown}:{lineno}", linecache.getline(filename, lineno).strip()


def _attribute(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[RetainedLine]:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__)]
    grown = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    lines = []
    for stat in grown[:TOP_LINES]:
        if stat.size_diff <= 0:
            break
        frame = stat.traceback[0]
        where, code = _where(frame.filename, frame.lineno)
        lines.append(RetainedLine(where, code, stat.size_diff, stat.count_diff))
    return lines


async def store_bytes(*, events: int, tokens: int) -> StoreBytesResult:
    """Write `events` text deltas in responses of `tokens` into a fresh embedded store and account what it keeps:
    traced memory after (every reference but the store's dropped, `gc.collect()`) minus before it was created."""
    shape = plan(events, tokens)
    result = StoreBytesResult(responses=len(shape), deltas=sum(shape))
    started = time.perf_counter()
    # A throwaway response first, so lazy set-up (validators, caches, first-use imports) is not counted.
    warm = MemoryStore(retention_seconds=RETENTION_SECONDS)
    await write_response(warm, -1, 20)
    await warm.close()
    del warm
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    tracemalloc.start(1)
    try:
        # Allocated before the baseline: the ids it will hold are the store's own keys, so it adds nothing.
        ids = [""] * len(shape)
        before_lines = tracemalloc.take_snapshot()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        store = MemoryStore(retention_seconds=RETENTION_SECONDS)
        for index, count in enumerate(shape):
            ids[index] = await write_response(store, index, count)
        gc.collect()
        result.retained_bytes = tracemalloc.get_traced_memory()[0] - before
        after_lines = tracemalloc.take_snapshot()
        result.lines = _attribute(before_lines, after_lines)
        del before_lines, after_lines
        for response_id in ids:
            stored: list[StoredEvent] = store.events_after(response_id, -1, limit=1 << 30)
            result.events += len(stored)
            result.json_bytes += sum(len(event.data) for event in stored)
        await store.close()
        del store, stored
        _measure_trimming(result)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    result.seconds = time.perf_counter() - started
    return result
