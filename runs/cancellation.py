"""Cancelling a background response from any instance, whatever its state: the cancel is recorded in the store and
announced; the instance that runs it stops its upstream call and writes the one terminal event, and one that nobody
runs (queued, or orphaned by a dead owner) is ended right here, never sent upstream."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from runs.errors import InvalidRequest, response_not_found
from runs.status import TERMINAL, ResponseStatus
from storage.base import ResponseRecord

if TYPE_CHECKING:
    from runs.manager import RunManager

# How long a cancel request waits for the owning instance to write the terminal event.
CANCEL_WAIT_SECONDS = 10.0
CANCEL_POLL_SECONDS = 0.02
# While it waits, how often it tries to claim the response (its owner may have died after the request).
CANCEL_CLAIM_SECONDS = 0.5


async def cancel_response(manager: RunManager, response_id: str, *, tenant: str) -> ResponseRecord:
    """Cancel a background response, wherever it runs and whatever its state, and return it once it has ended. A
    queued (or orphaned) one is ended right here, never sent upstream.

    Follows OpenAI's rules: cancelling a cancelled response returns it again; a finished one or a synchronous one
    cannot be cancelled (400); an unknown one is 404.
    """
    store, lifecycle = manager.store, manager.lifecycle
    record = await store.get_response(response_id, tenant=tenant)
    if record is None or not record.stored or record.tenant != tenant:
        raise response_not_found(response_id)
    if not record.background:
        raise InvalidRequest("Cannot cancel a synchronous response.", code="response_not_cancellable")
    _refuse_if_finished(record)
    if ResponseStatus(record.status) in TERMINAL:
        return record
    status = await lifecycle.request_cancel(response_id)
    if status is None:
        raise response_not_found(response_id)
    if ResponseStatus(status) in TERMINAL:  # it ended meanwhile
        current = await store.get_response(response_id)
        if current is None:
            raise response_not_found(response_id)
        _refuse_if_finished(current)
        return current
    run = manager.local_run(response_id)
    if run is not None:
        run.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.wait_finished(), CANCEL_WAIT_SECONDS)
    elif record.status == ResponseStatus.QUEUED or record.lease_until_ms == 0:
        await lifecycle.cancel_unowned(response_id)
    return await _wait_until_finished(manager, response_id)


def _refuse_if_finished(record: ResponseRecord) -> None:
    status = ResponseStatus(record.status)
    if status in TERMINAL and status is not ResponseStatus.CANCELLED:
        raise InvalidRequest(f"Cannot cancel a {status.value} response.", code="response_not_cancellable")


async def _wait_until_finished(manager: RunManager, response_id: str) -> ResponseRecord:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_WAIT_SECONDS
    next_claim = loop.time() + CANCEL_CLAIM_SECONDS
    while True:
        record = await manager.store.get_response(response_id)
        if record is None:
            raise response_not_found(response_id)
        if ResponseStatus(record.status) in TERMINAL or loop.time() > deadline:
            return record
        if loop.time() >= next_claim and manager.local_run(response_id) is None:
            # An owner that died after the request: once its lease lapses the response is ours to end.
            next_claim = loop.time() + CANCEL_CLAIM_SECONDS
            await manager.lifecycle.cancel_unowned(response_id)
        await asyncio.sleep(CANCEL_POLL_SECONDS)
