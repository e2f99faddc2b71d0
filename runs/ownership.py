"""Run ownership across the fleet: the keeper renews this instance's leases; the sweeper finishes what nobody owns
any more and starts queued runs where there is room."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from runs.manager import SWEPT, RunManager
from runs.run import ResponseRun
from runs.status import TERMINAL, ResponseStatus
from storage.base import Store

log = logging.getLogger(__name__)

# Orphans looked at per sweep (more wait for the next one, a sweep period later).
SWEEP_BATCH = 100


def _stop_if_cancelled() -> None:
    """redis-py can swallow a cancellation that lands while it (re)connects; loops that call it check here, so
    cancelling them always ends them."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# A sweep passes over at most this many queued responses whose tenants are at their limits, looking for one
# it may start (so a tenant that queued thousands costs a bounded read).
MAX_PASSED_OVER = 256


class Ownership:
    """Two loops per instance. The keeper renews the lease of every local run (a run whose lease is lost stops at
    once: the store would refuse its writes anyway). The sweeper, on every instance (claims are atomic, so
    sweepers never need a lock that could outlive its holder), looks at the run index for responses whose lease
    expired — ending, restarting or settling each as its stored state says, one at a time so that one that fails
    never holds up the rest — and then starts queued responses in admission order while this instance has room."""

    def __init__(self, manager: RunManager, store: Store) -> None:
        self._manager = manager
        self._store = store
        self._settings = manager.settings
        self._lifecycle = manager.lifecycle
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
            await self._lifecycle.renew(run)
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
        """One look at everything due: orphans first (found however long the queue is), then the queue's head.
        A draining instance sweeps nothing: what it hands over is for the others to take."""
        if self._manager.draining:
            return
        for response_id in await self._store.due_runs(SWEEP_BATCH):
            try:
                await self._look_at(response_id)
            except Exception:
                log.exception("sweep: could not deal with %s now; it stays due", response_id)
        await self.start_queued()

    async def start_queued(self) -> None:
        """Claim queued responses in admission order while this instance has a free run slot, passing over those
        whose tenant is at its limit here (they keep their place; the ones behind them are not held up)."""
        if self._manager.draining:
            return
        passed_over: set[str] = set()
        while self._manager.free_capacity > 0 and len(passed_over) < MAX_PASSED_OVER:
            wanted = self._manager.free_capacity + len(passed_over)
            head = await self._store.queued_runs(wanted)
            # A shorter head than asked for is the whole queue: once it is claimed, nothing waits.
            self._manager.queue_seen(waiting=len(head) >= wanted)
            claimed_any = passed_any = False
            for response_id in head:
                if response_id in passed_over:
                    continue
                tenant = await self._tenant_of(response_id)
                if not self._manager.try_take_slot(tenant):
                    if self._manager.free_capacity == 0:
                        return
                    passed_over.add(response_id)  # its tenant is at its limit here: it keeps its place
                    passed_any = True
                    continue
                try:
                    claimed_any |= await self._manager.take_over(response_id, needs_slot=True, slot_tenant=tenant)
                except Exception:
                    log.exception("could not start queued %s now", response_id)
                    return
            if not (claimed_any or passed_any):
                return  # all taken by other instances meanwhile (or nothing queued): the next sweep looks again

    async def _tenant_of(self, response_id: str) -> str:
        """Whose a queued response is, when some tenant has a limit (one read): its slot is then taken for that
        tenant, checked against its limit in the same step. Otherwise any slot will do (SWEPT)."""
        if not self._manager.settings.tenant_run_limits:
            return SWEPT
        record = await self._store.get_response(response_id)
        return record.tenant if record is not None else SWEPT

    async def _look_at(self, response_id: str) -> None:
        record = await self._store.get_response(response_id)
        if record is None or ResponseStatus(record.status) in TERMINAL:
            await self._lifecycle.settle(response_id)  # ended (or gone): only its follow-ups are left
            return
        if self._manager.local_run(response_id) is not None:
            return  # ours, and its renewal is late (the store was slow): the keeper deals with it
        # Only a response that will be run again needs a slot; ending one (cancelled, orphaned after output,
        # discarded) does not, so orphans are ended even on a full instance.
        needs_slot = self._lifecycle.will_run(record)
        if needs_slot and not self._manager.try_take_slot():
            return  # it may need a run slot; an instance with room will take it
        if await self._manager.take_over(response_id, needs_slot=needs_slot):
            self._lifecycle.metrics.taken_over(record.lease_until_ms)
