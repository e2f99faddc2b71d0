"""When the garbage collector may stop the loop: rarely while a client waits for a response's first output.

CPython's cyclic collector runs when enough container objects have been made, wherever the loop is. Each of its
collections walks the young objects, and with a few hundred requests in flight (each holds its coroutines, tasks,
contexts, buffers) one takes 3-40 ms on this loop, every stream waiting meanwhile. A burst of 200 creates made
two or three of them before the last first token was written: 20-55 ms of the time to first token, the number
users wait on. The same pause once the tokens flow is one late token among hundreds.

So while any streamed create waits for its first output, the young generation's threshold is raised GROWTH_CAP
times, for `server.gc_hold_seconds` at most: the collection that falls due meanwhile runs once no create is
waiting (or the time is up), among the tokens. The collector is never turned off: a young generation that reaches
the raised threshold is collected there and then, so a collection that waited is at most GROWTH_CAP times the size
of one that did not. Garbage without cycles is freed at once either way; only cycles wait for a collection.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from aiohttp import web

from runs.countdown import Countdown

# How far a hold raises the young generation's collection threshold.
GROWTH_CAP = 3


def _not_counted() -> None:
    return None


class GcPacing:
    """Holds back young-generation collections while any create waits for its first output (see the module).

    A hold raises the threshold the collector has when it starts, and puts back exactly that. Threshold changes
    are process-wide: of two apps in one process (tests), one holds at a time, and its hold serves both."""

    def __init__(self, hold_seconds: float) -> None:
        self._hold_seconds = hold_seconds
        self._waiting = Countdown(self._release)
        self._held: tuple[int, int] | None = None  # (the threshold put back, the one raised to) during a hold
        self._deadline: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def holding(self) -> bool:
        return self._held is not None

    def create_waiting(self) -> Callable[[], None]:
        """Count a create that now waits for its first output, and hold collections back if none is held; call
        what is returned once its first output is written, or once the request ends without one (only the first
        call counts)."""
        if self._held is None and not self._closed:
            threshold = gc.get_threshold()
            raised = threshold[0] * GROWTH_CAP
            if raised > 0:  # a threshold of 0 means the collector is off: nothing to hold
                self._deadline = asyncio.get_running_loop().call_later(self._hold_seconds, self._release)
                gc.set_threshold(raised, *threshold[1:])
                self._held = (threshold[0], raised)
        return self._waiting.add()

    def close(self) -> None:
        """End the hold, and take no more (the app is stopping)."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._held is not None:
            base, raised = self._held
            self._held = None
            threshold = gc.get_threshold()
            if threshold[0] == raised:  # else someone has set it since: theirs stays
                gc.set_threshold(base, *threshold[1:])


GC_PACING = web.AppKey("gc_pacing", GcPacing)
# A streamed create's own count in the pacing, for its stream's clock to call (gateway/metrics.StreamClock).
FIRST_OUTPUT_WRITTEN: web.RequestKey[Callable[[], None]] = web.RequestKey("first_output_written")


def install(app: web.Application, hold_seconds: float) -> None:
    """Creates wait for their first output with collections held back for up to `hold_seconds` (0: they do not)."""
    if hold_seconds <= 0:
        return
    pacing = app[GC_PACING] = GcPacing(hold_seconds)

    async def stop_holding(_: web.Application) -> None:
        pacing.close()

    app.on_shutdown.append(stop_holding)  # before any cleanup step, which may fail


def create_waiting(app: web.Application) -> Callable[[], None]:
    """`GcPacing.create_waiting` of `app`'s pacing; a no-op without one (`server.gc_hold_seconds: 0`)."""
    pacing = app.get(GC_PACING)
    return _not_counted if pacing is None else pacing.create_waiting()
