"""Run ownership across the fleet: renewing this instance's leases, and sweeping up runs nobody owns any more."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson

from runs.event_log import EventLog
from runs.manager import RunManager, settle
from runs.request import CreateResponseRequest
from runs.run import ResponseRun, fail_orphaned
from runs.status import TERMINAL, ResponseStatus
from storage.base import LeaseLost, Store

log = logging.getLogger(__name__)


def _stop_if_cancelled() -> None:
    """redis-py can swallow a cancellation that lands while it (re)connects; loops that call it check here, so
    cancelling them always ends them."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


SWEEP_LOCK = "sweep"
SWEEP_BATCH = 100
ORPHAN_MESSAGE = (
    "The gateway instance running this response stopped after it had started answering; the partial output is "
    "kept. Retry the request to get a complete answer."
)


class Ownership:
    """Two loops per instance. The keeper renews the lease of every local run (a run whose lease is lost stops
    at once: the store would refuse its writes anyway). The sweeper, one instance at a time through a short
    lock, looks at runs whose lease expired or that were queued: it starts queued ones and restarts orphans that
    had not emitted output yet (when this instance has room), and ends orphans that had with one `failed` event."""

    def __init__(self, manager: RunManager, store: Store) -> None:
        self._manager = manager
        self._store = store
        self._settings = manager.settings
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="lease-keeper"),
            asyncio.create_task(self._sweep_loop(), name="sweeper"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew_loop(self) -> None:
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(self._settings.renew_seconds)
            # All at once: renewing a thousand leases one round trip after another would outlast the lease.
            runs = [run for run in self._manager.local_runs() if not run.finished and not run.abandoned]
            await asyncio.gather(*(self._renew(run) for run in runs))

    async def _renew(self, run: ResponseRun) -> None:
        try:
            run.lease = await self._store.renew_lease(run.response_id, run.lease, lease_ms=self._settings.lease_ms)
            await self._store.index_run(run.response_id, run.lease.until_ms)
        except LeaseLost:
            log.warning("lease of %s lost; stopping it here", run.response_id)
            run.abandon()
        except Exception as error:
            # The store is unreachable: keep going; if the lease runs out meanwhile, the run's next write is
            # refused and it stops, and whoever sweeps first finishes it.
            log.warning("could not renew the lease of %s: %s", run.response_id, error)

    async def _sweep_loop(self) -> None:
        freed = self._manager.capacity_freed
        while True:
            _stop_if_cancelled()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), self._settings.sweep_seconds)
            freed.clear()
            try:
                await self.sweep_once()
            except Exception as error:
                log.warning("sweep failed: %s", error)

    async def sweep_once(self) -> None:
        owner = self._settings.instance_id
        lock_ms = int(max(self._settings.sweep_seconds * 5, 10) * 1000)
        if not await self._store.try_lock(SWEEP_LOCK, owner, ttl_ms=lock_ms):
            return
        try:
            for response_id in await self._store.due_runs(SWEEP_BATCH):
                await self._look_at(response_id)
        finally:
            await self._store.unlock(SWEEP_LOCK, owner)

    async def _look_at(self, response_id: str) -> None:
        record = await self._store.get_response(response_id)
        if record is None or ResponseStatus(record.status) in TERMINAL:
            await self._store.unindex_run(response_id)
            return
        if self._manager.local_run(response_id) is not None:
            return
        started_output = bool(orjson.loads(record.snapshot).get("output"))
        if not started_output and self._manager.free_capacity == 0:
            return  # it needs a run slot; an instance with room will take it
        claimed = await self._store.claim_response(
            response_id, self._settings.instance_id, lease_ms=self._settings.lease_ms
        )
        if claimed is None:
            return  # its owner is alive after all, or it just ended
        lease, recoveries = claimed
        record = await self._store.get_response(response_id)  # fresh: the old owner is fenced out from here on
        if record is None:
            return
        await self._store.index_run(response_id, lease.until_ms)
        snapshot = orjson.loads(record.snapshot)
        if snapshot.get("output"):
            log.warning("%s lost its owner after output began: ending it failed", response_id)
            event_log = EventLog(
                self._store, response_id, snapshot, next_sequence_number=record.last_sequence_number + 1, lease=lease
            )
            await fail_orphaned(event_log, ORPHAN_MESSAGE)
            request = CreateResponseRequest.model_validate_json(record.request)
            conversation_id = None
            if request.conversation is not None and request.is_stored:
                conversation_id = (
                    request.conversation if isinstance(request.conversation, str) else request.conversation.id
                )
            await settle(self._store, response_id, event_log.snapshot, conversation_id, [])
            return
        if recoveries:
            log.warning(
                "%s lost its owner before any output: restarting it here (recovery %d)", response_id, recoveries
            )
        await self._manager.resume(record, lease)
