"""Collections wait while a create awaits its first output (gateway/collector.py): the pacing's own rules, then
what a client of the gateway gets, over SSE and a WebSocket, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import openai
import pytest

from gateway.collector import COLLECTION_PACING, GROWTH_CAP, CollectionPacing
from tests.conftest import Gateway


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """Whatever a test does to the collector, the next one finds it as it was."""
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    if enabled:
        gc.enable()
    else:
        gc.disable()


async def test_collections_wait_while_any_create_awaits_its_first_output() -> None:
    pacing = CollectionPacing(hold_seconds=30)
    assert gc.isenabled()
    first = pacing.awaiting_first_output()
    assert not gc.isenabled()
    assert pacing.holding
    second = pacing.awaiting_first_output()
    first()
    first()  # only a create's first call counts: the second create still waits
    assert not gc.isenabled()
    second()
    assert gc.isenabled()
    assert not pacing.holding
    third = pacing.awaiting_first_output()  # the next create holds them again
    assert not gc.isenabled()
    third()
    assert gc.isenabled()


async def test_a_hold_ends_at_its_deadline_and_the_next_create_holds_again() -> None:
    pacing = CollectionPacing(hold_seconds=0.05)
    slow = pacing.awaiting_first_output()
    assert not gc.isenabled()
    await asyncio.sleep(0.2)
    assert gc.isenabled(), "a create still waiting holds collections no longer than hold_seconds"
    later = pacing.awaiting_first_output()
    assert not gc.isenabled()
    later()
    assert not gc.isenabled(), "the slow create still waits"
    slow()
    assert gc.isenabled()


async def test_a_young_generation_grown_past_the_cap_ends_the_hold() -> None:
    gc.collect()
    gc.set_threshold(100, *gc.get_threshold()[1:])
    pacing = CollectionPacing(hold_seconds=30)
    waiting = pacing.awaiting_first_output()
    assert not gc.isenabled()
    kept = [[index] for index in range(GROWTH_CAP * 100 + 50)]  # young container objects, alive
    assert gc.get_count()[0] >= GROWTH_CAP * 100
    another = pacing.awaiting_first_output()
    assert gc.isenabled(), "a collection this far past due runs now"
    assert not pacing.holding
    assert gc.get_count()[0] < 100, "at the next allocation (the callback made for this create)"
    held_again = pacing.awaiting_first_output()
    assert not gc.isenabled()
    for written in (waiting, another, held_again):
        written()
    assert gc.isenabled()
    assert len(kept) == GROWTH_CAP * 100 + 50


async def test_a_collector_turned_off_elsewhere_is_left_off() -> None:
    pacing = CollectionPacing(hold_seconds=30)
    gc.disable()
    written = pacing.awaiting_first_output()
    assert not pacing.holding
    written()
    pacing.close()
    assert not gc.isenabled()


async def test_closing_ends_a_hold() -> None:
    pacing = CollectionPacing(hold_seconds=30)
    written = pacing.awaiting_first_output()
    pacing.close()
    assert gc.isenabled()
    written()
    assert gc.isenabled()


SLOW_FIRST_TOKEN = {"sim_tokens": "3", "sim_token_delay_ms": "5", "sim_ttft_ms": "250"}


@pytest.mark.parametrize("storage_url", ["memory", "redis"], indirect=True)
async def test_a_streamed_create_holds_collections_until_its_first_output_is_written(gateway: Gateway) -> None:
    assert gateway.app is not None
    pacing = gateway.app[COLLECTION_PACING]
    stream = await gateway.client.responses.create(model="sim-1", input="hello", stream=True, metadata=SLOW_FIRST_TOKEN)
    seen = []
    async for event in stream:
        seen.append(event.type)
        if event.type in ("response.created", "response.in_progress"):
            assert pacing.holding
            assert not gc.isenabled()
        else:  # written only after the first output was, which ended the hold
            assert not pacing.holding, event.type
            assert gc.isenabled()
    assert seen[0] == "response.created"
    assert seen[-1] == "response.completed"


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
async def test_a_create_that_ends_without_output_ends_its_hold(gateway: Gateway) -> None:
    assert gateway.app is not None
    pacing = gateway.app[COLLECTION_PACING]
    with pytest.raises(openai.BadRequestError):
        await gateway.client.responses.create(model="sim-1", input="hello", stream=True, temperature=7)
    assert not pacing.holding
    # A create nobody streams waits for no first output: nothing is held while it runs.
    running = asyncio.create_task(
        gateway.client.responses.create(model="sim-1", input="hello", metadata=SLOW_FIRST_TOKEN)
    )
    await asyncio.sleep(0.15)
    assert not pacing.holding
    assert gc.isenabled()
    response = await running
    assert response.status == "completed"


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
async def test_a_socket_create_holds_collections_until_its_first_output_is_sent(gateway: Gateway) -> None:
    assert gateway.app is not None
    pacing = gateway.app[COLLECTION_PACING]
    async with gateway.client.responses.connect() as connection:
        await connection.response.create(model="sim-1", input="hello socket", metadata=SLOW_FIRST_TOKEN)
        async with asyncio.timeout(20):
            async for event in connection:
                if event.type in ("response.created", "response.in_progress"):
                    assert pacing.holding
                else:
                    assert not pacing.holding, event.type
                if event.type == "response.completed":
                    break
    assert gc.isenabled()
