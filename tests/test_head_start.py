"""Provider calls made ahead of admission (runs/upstream/head_start.py): admissions' work waits until the calls
already made have left, never longer than the limit, and a call that ends without leaving does not hold it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from runs.upstream import head_start
from runs.upstream.base import UpstreamFailure, UpstreamSpec
from runs.upstream.client import UpstreamClient
from runs.upstream.head_start import HeadStart, SendsFirst
from tests.conftest import free_port

LIVENESS_SECONDS = 5  # far above any wait these tests expect; only a hang reaches it


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A limit no test reaches, so that a wait that returns proves the calls left rather than the limit passing."""
    monkeypatch.setattr(head_start, "SENDS_FIRST_LIMIT_SECONDS", 600)


async def waits(sends: SendsFirst) -> bool:
    """Whether `wait()` is still waiting after a few turns of the loop."""
    waiting = asyncio.create_task(sends.wait())
    for _ in range(5):
        await asyncio.sleep(0)
    still = not waiting.done()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    return still


@pytest.mark.usefixtures("patient")
async def test_a_wait_lasts_until_every_call_made_has_left() -> None:
    sends = SendsFirst()
    assert not await waits(sends)  # nothing made: no wait
    first, second = sends.sending(), sends.sending()
    assert await waits(sends)
    first()
    first()  # only a callback's first call counts
    assert await waits(sends)
    second()
    assert not await waits(sends)
    third = sends.sending()  # a new call after all had left waits again
    assert await waits(sends)
    third()
    await asyncio.wait_for(sends.wait(), LIVENESS_SECONDS)


async def test_a_call_that_never_leaves_holds_a_wait_only_up_to_the_limit() -> None:
    sends = SendsFirst()
    sends.sending()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(sends.wait(), LIVENESS_SECONDS)
    assert loop.time() - began >= head_start.SENDS_FIRST_LIMIT_SECONDS * 0.9  # it did wait, for the limit


@pytest.fixture
async def held_provider() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A provider that reads the whole request and then answers only once `answer` is set."""
    answer = asyncio.Event()

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        await answer.wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\ndata: [DONE]\n\n')
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/v1")), answer
    await server.close()


def client_for(base_url: str) -> UpstreamClient:
    return UpstreamClient(UpstreamSpec(name="prov", kind="chat", base_url=base_url))


@pytest.mark.usefixtures("patient")
async def test_a_head_start_counts_as_left_once_its_request_is_written(
    held_provider: tuple[str, asyncio.Event],
) -> None:
    base_url, answer = held_provider
    client = client_for(base_url)
    sends = SendsFirst()
    try:
        call = HeadStart(client.stream_json("/chat/completions", {"model": "m"}), sends)
        await asyncio.wait_for(sends.wait(), LIVENESS_SECONDS)  # the provider has not answered yet
        assert not answer.is_set()
        answer.set()
        read = [item async for batch in call.batches() for item in batch]
        assert read == [{"n": 1}]
    finally:
        await client.close()


async def failing() -> AsyncGenerator[list[dict[str, Any]], None]:
    raise UpstreamFailure("upstream 'prov' unreachable", retryable=True)
    yield []  # a generator that fails at its first step


@pytest.mark.usefixtures("patient")
async def test_a_call_that_fails_before_it_leaves_does_not_hold_the_wait() -> None:
    sends = SendsFirst()
    refused = client_for(f"http://127.0.0.1:{free_port()}/v1")
    try:
        calls = [HeadStart(failing(), sends), HeadStart(refused.stream_json("/chat/completions", {}), sends)]
        await asyncio.wait_for(sends.wait(), LIVENESS_SECONDS)
        for call in calls:
            with pytest.raises(UpstreamFailure):
                async for _ in call.batches():
                    pass
    finally:
        await refused.close()


@pytest.mark.usefixtures("patient")
async def test_a_call_dropped_before_it_leaves_does_not_hold_the_wait(held_provider: tuple[str, asyncio.Event]) -> None:
    base_url, _ = held_provider
    client = client_for(base_url)
    sends = SendsFirst()
    try:
        call = HeadStart(client.stream_json("/chat/completions", {"model": "m"}), sends)
        await call.discard()  # before its first step: its request was never written
        await asyncio.wait_for(sends.wait(), LIVENESS_SECONDS)
    finally:
        await client.close()
