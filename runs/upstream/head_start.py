"""A provider call started while its response is still being admitted.

The provider's first token is what a client waits for, and the admission's store round trip is not needed to ask
for it: the request goes out first, and the run reads its answer once the response is stored. Nothing the
provider sends is emitted before then (the run only starts reading after admission), so persist-before-publish
holds. Only an admission that fails after every check of the request (the store unavailable) leaves a call to drop:
closing it stops the provider's generation at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

Batch = list[dict[str, Any]]


class HeadStart:
    """Reads a provider stream in a task of its own until the run takes it over; `batches()` yields what was read
    meanwhile, then the rest, and `discard()` closes the stream whoever reads it.

    The stream is never left unread while the run is admitted: aiohttp drops a response's buffered bytes once the
    connection has failed (a provider that crashes right after sending them), so a pause in reading could lose
    output that a continuous reader gets."""

    def __init__(self, stream: AsyncGenerator[Batch, None]) -> None:
        self._stream = stream
        self._read: deque[Batch] = deque()
        self._arrived = asyncio.Event()
        self._taken_over = False
        self._discarded = False
        self._reader: asyncio.Task[bool] = asyncio.create_task(self._read_ahead())
        self._reader.add_done_callback(lambda _: self._arrived.set())

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
