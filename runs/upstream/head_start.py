"""A provider call started while its response is still being admitted.

The provider's first token is what a client waits for, and the admission's store round trip is not needed to ask
for it: the request goes out first, and the run reads its answer once the response is stored. Nothing the
provider sends is emitted before then (the run only starts reading after admission), so persist-before-publish
holds. Only an admission that fails after every check of the request (the store unavailable) leaves a call to drop:
closing it stops the provider's generation at once.

`SendsFirst` orders the work on the loop: calls leave before admissions' work runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from runs.countdown import Countdown
from runs.upstream.client import request_written

Batch = list[dict[str, Any]]

# The longest admission's work waits for provider calls still to leave. It bounds what a call that is slow to go
# out (a new connection, a TLS handshake) can add to every other response's admission; a call on a pooled
# connection leaves within two turns of the loop.
SENDS_FIRST_LIMIT_SECONDS = 0.01


class SendsFirst:
    """Holds admissions' work until the provider calls already made have been written to their connections.

    All of a process's requests share one loop. After a burst of requests, each admission's work (its response
    built, stored and announced: most of a request's cost) would otherwise run between the other requests' calls,
    and the last call of the burst, and so its first token, would wait behind every admission before it. Counts
    the calls not yet written; `wait()` returns once there are none, or after SENDS_FIRST_LIMIT_SECONDS."""

    def __init__(self) -> None:
        self._all_sent = asyncio.Event()  # bound to a loop only when first waited on (Python >= 3.10)
        self._all_sent.set()
        self._unsent = Countdown(self._all_sent.set)

    def sending(self) -> Callable[[], None]:
        """Count a call about to be made; the callback returned says it has left (or ended without leaving), and
        only its first call counts."""
        self._all_sent.clear()
        return self._unsent.add()

    async def wait(self) -> None:
        """Until no call is left to write, or for SENDS_FIRST_LIMIT_SECONDS at most."""
        if self._all_sent.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SENDS_FIRST_LIMIT_SECONDS):
                await self._all_sent.wait()


class HeadStart:
    """Reads a provider stream in a task of its own until the run takes it over; `batches()` yields what was read
    meanwhile, then the rest, and `discard()` closes the stream whoever reads it.

    The stream is never left unread while the run is admitted: aiohttp drops a response's buffered bytes once the
    connection has failed (a provider that crashes right after sending them), so a pause in reading could lose
    output that a continuous reader gets."""

    def __init__(self, stream: AsyncGenerator[Batch, None], sends: SendsFirst) -> None:
        self._stream = stream
        self._read: deque[Batch] = deque()
        self._arrived = asyncio.Event()
        self._taken_over = False
        self._discarded = False
        sent = sends.sending()
        reading = contextvars.copy_context()
        reading.run(request_written.set, sent)  # heard by the upstream client once the request has left
        self._reader: asyncio.Task[bool] = asyncio.create_task(self._read_ahead(), context=reading)
        self._reader.add_done_callback(lambda _: self._read_ended(sent))

    def _read_ended(self, sent: Callable[[], None]) -> None:
        self._arrived.set()
        sent()  # a call that failed (or was dropped) before its request left is not waited for

    async def _read_ahead(self) -> bool:
        """Read until the run takes over (True: stopped at a batch boundary) or the stream ends (False)."""
        async for batch in self._stream:
            self._read.append(batch)
            self._arrived.set()
            if self._taken_over:
                return True
        return False

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """The stream from its first batch on; leaving it (a cancel, a failure, the end) closes the stream."""
        self._taken_over = True
        try:
            while True:
                while self._read:
                    yield self._read.popleft()
                if self._reader.done():
                    break
                self._arrived.clear()
                await self._arrived.wait()  # a batch, or the reader's end
            if self._reader.result():  # stopped for the take-over: the stream goes on from where it was
                async for batch in self._stream:
                    yield batch
        finally:
            await self.discard()

    async def discard(self) -> None:
        """Drop the call (idempotent): its connection is closed, so the provider stops generating."""
        if self._discarded:
            return
        self._discarded = True
        self._reader.cancel()  # no-op once it is done
        await asyncio.wait({self._reader})
        if not self._reader.cancelled():
            self._reader.exception()  # retrieved, so a failure nobody reads is not reported as lost
        await self._stream.aclose()
