"""A provider call started while its response is still being admitted.

The provider's first token is what a client waits for, and the admission's store round trip is not needed to ask
for it: the request goes out first, and the run reads its answer once the response is stored. Nothing the
provider sends is emitted before then (the run only starts reading after admission), so persist-before-publish
holds. Only an admission that fails after every check of the request (the store unavailable) leaves a call to drop:
closing it stops the provider's generation at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

Batch = list[dict[str, Any]]


class HeadStart:
    """Runs a provider stream up to its first batch (or its failure) in a task of its own; `batches()` then yields
    that batch and the rest, and `discard()` closes the stream whoever owns it."""

    def __init__(self, stream: AsyncGenerator[Batch, None]) -> None:
        self._stream = stream
        self._first: asyncio.Task[Batch | None] = asyncio.create_task(_first_batch(stream))
        self._discarded = False

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """The stream from its first batch on; leaving it (a cancel, a failure, the end) closes the stream."""
        try:
            first = await self._first
            if first is None:
                return
            yield first
            async for batch in self._stream:
                yield batch
        finally:
            await self.discard()

    async def discard(self) -> None:
        """Drop the call (idempotent): its connection is closed, so the provider stops generating."""
        if self._discarded:
            return
        self._discarded = True
        self._first.cancel()  # no-op once it is done
        await asyncio.wait({self._first})
        if not self._first.cancelled():
            self._first.exception()  # retrieved, so a failure nobody reads is not reported as lost
        await self._stream.aclose()


async def _first_batch(stream: AsyncGenerator[Batch, None]) -> Batch | None:
    """The first batch, or None for a stream that ended without one."""
    async for batch in stream:
        return batch
    return None
