"""When the garbage collector may stop the loop: not while a client waits for a response's first output.

CPython's cyclic collector runs when enough container objects have been made, wherever the loop is. Each of its
collections walks the young objects, and with a few hundred requests in flight (each holds its coroutines, tasks,
contexts, buffers) one takes 3-40 ms on this loop, every stream waiting meanwhile. A burst of 200 creates made
two or three of them before the last first token was written: 20-55 ms of the time to first token, the number
users wait on. The same pause once the tokens flow is one late token among hundreds.

So a create that is waiting for its first output holds automatic collections back, for
`server.gc_hold_seconds` at most; they resume as soon as no create is waiting (or the time is up), and the one
that fell due meanwhile runs then. The collector still runs as often: a hold only moves a collection a moment
later, never skips one. A hold ends early once the young generation holds GROWTH_CAP times its threshold, so a
collection that waited is never more than a few times the size of one that did not. Garbage without cycles is
freed at once either way; only cycles wait for a collection.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Sequence

from aiohttp import web

from runs.countdown import Countdown
from runs.snapshot import LIFECYCLE_EVENT_TYPES
from runs.store import StoredEvent

# A hold ends once the young generation has grown to this many times its collection threshold.
GROWTH_CAP = 3


def _nothing() -> None:
    return None


class CollectionPacing:
    """Holds the collector's automatic collections while any create awaits its first output (see the module).

    A hold is this object's `gc.disable()`, undone by its own `gc.enable()`: a collector turned off by someone
    else is left alone."""

    def __init__(self, hold_seconds: float) -> None:
        self._hold_seconds = hold_seconds
        self._waiting = Countdown(self._release)
        self._holding = False
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def holding(self) -> bool:
        return self._holding

    def awaiting_first_output(self) -> Callable[[], None]:
        """Count a create that now waits for its first output; call what is returned once it is written, or once
        the request ends without it (only the first call counts)."""
        young, threshold = gc.get_count()[0], gc.get_threshold()[0]
        if self._holding:
            if young >= GROWTH_CAP * threshold:
                self._release()  # the due collection runs at the next allocation; the next create holds again
        elif young < GROWTH_CAP * threshold and gc.isenabled():
            gc.disable()
            self._holding = True
            self._deadline = asyncio.get_running_loop().call_later(self._hold_seconds, self._release)
        return self._waiting.add()

    def close(self) -> None:
        """Let the collector run freely again (the app is stopping)."""
        self._release()

    def _release(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._holding:
            self._holding = False
            gc.enable()


COLLECTION_PACING = web.AppKey("collection_pacing", CollectionPacing)
# The request's own count in the pacing, for whatever writes its first output (gateway/metrics.StreamClock).
FIRST_OUTPUT_WRITTEN: web.RequestKey[Callable[[], None]] = web.RequestKey("first_output_written")


def install(app: web.Application, hold_seconds: float) -> None:
    """Creates wait for their first output without collections for up to `hold_seconds` (0: they do not)."""
    if hold_seconds <= 0:
        return
    pacing = app[COLLECTION_PACING] = CollectionPacing(hold_seconds)

    async def release(_: web.Application) -> None:
        pacing.close()  # a hold never outlives the app (its deadline timer dies with the loop)

    app.on_cleanup.append(release)


def first_output_awaited(app: web.Application) -> Callable[[], None]:
    """Count a create of `app` as waiting for its first output; a no-op without pacing (`server.gc_hold_seconds:
    0`)."""
    pacing = app.get(COLLECTION_PACING)
    return _nothing if pacing is None else pacing.awaiting_first_output()


def awaiting_first_output(request: web.Request) -> Callable[[], None]:
    """`first_output_awaited` for a create request, its callback kept where its stream's clock finds it."""
    written = request[FIRST_OUTPUT_WRITTEN] = first_output_awaited(request.app)
    return written


def has_output(batch: Sequence[StoredEvent]) -> bool:
    """Whether `batch` holds an output event (its first one is what a client waits for)."""
    return any(event.type not in LIFECYCLE_EVENT_TYPES for event in batch)
