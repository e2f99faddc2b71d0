"""The run manager: admits requests as ResponseRuns, owns their tasks, and stops them at shutdown."""

from __future__ import annotations

import asyncio
import logging

from runs.admission import check_admissible, new_response, upstream_body
from runs.event_log import EventLog
from runs.request import CreateResponseRequest
from runs.run import ResponseRun
from runs.upstream.router import UpstreamRouter
from storage.base import Store

log = logging.getLogger(__name__)


class RunManager:
    """Runs live here, not in HTTP handlers, so a client's disconnect never ends a stored response."""

    def __init__(self, store: Store, router: UpstreamRouter) -> None:
        self._store = store
        self._router = router
        self._runs: dict[str, ResponseRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def store(self) -> Store:
        return self._store

    @property
    def active_count(self) -> int:
        return len(self._runs)

    def local_run(self, response_id: str) -> ResponseRun | None:
        """The run for `response_id` if this instance executes it."""
        return self._runs.get(response_id)

    async def admit(self, request: CreateResponseRequest) -> ResponseRun:
        """Validate, store the response with its first events, and start its run. Nothing is stored on error."""
        check_admissible(request)
        upstream = self._router.route(request.model)
        record, snapshot = new_response(request)
        await self._store.create_response(record)
        event_log = EventLog(self._store, record.response_id, snapshot, next_sequence_number=len(record.events))
        run = ResponseRun(request=request, upstream=upstream, upstream_body=upstream_body(request), log=event_log)
        self._runs[run.response_id] = run
        task = asyncio.create_task(run.execute(), name=f"run:{run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(run.response_id, done))
        return run

    def _forget(self, response_id: str, task: asyncio.Task[None]) -> None:
        self._runs.pop(response_id, None)
        self._tasks.discard(task)

    async def close(self) -> None:
        """Stop every run; each ends with a terminal event if the store can still take it."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def release_connection_owned(self, run: ResponseRun) -> None:
        """The connection that owns a `store=false` run is done: stop the run if it is still going, then forget its
        keys once it has ended (they existed only so its one subscriber could read the events)."""
        if not run.finished:
            run.cancel()
        task = asyncio.create_task(self._discard_after_finish(run), name=f"discard:{run.response_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discard_after_finish(self, run: ResponseRun) -> None:
        await run.wait_finished()
        try:
            await self._store.delete_response(run.response_id, only_if_finished=False)
        except Exception:
            log.warning("could not delete unstored response %s; its TTL will", run.response_id)
