"""Young-generation collections are held back while a streamed create waits for its first output
(gateway/gc_pacing.py): the pacing's own rules, then what clients of the gateway get over SSE and a WebSocket,
driven by the openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.gc_pacing import GC_PACING, GROWTH_CAP, GcPacing
from gateway.state import RUN_MANAGER
from tests.conftest import Gateway, eventually, gateway_settings, serve_gateway


@pytest.fixture(autouse=True)
def collector_untouched() -> Iterator[None]:
    """Each test leaves the collector as it found it: a gateway that has stopped holds nothing back."""
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    yield
    left = (gc.isenabled(), gc.get_threshold())
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()
    assert left == (enabled, thresholds)


def young_threshold() -> int:
    return gc.get_threshold()[0]


@contextlib.contextmanager
def young_threshold_of(value: int) -> Iterator[None]:
    """The young generation's threshold set to `value` for a test's own use, and put back."""
    thresholds = gc.get_threshold()
    gc.set_threshold(value, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


async def test_collections_are_held_back_while_any_create_waits_for_its_first_output() -> None:
    base = young_threshold()
    pacing = GcPacing(hold_seconds=30)
    first = pacing.create_waiting()
    assert pacing.holding
    assert young_threshold() == GROWTH_CAP * base
    second = pacing.create_waiting()
    first()
    first()  # only a create's first call counts: the second create still waits
    assert young_threshold() == GROWTH_CAP * base
    second()
    assert not pacing.holding
    assert young_threshold() == base
    third = pacing.create_waiting()  # the next create holds them back again
    assert young_threshold() == GROWTH_CAP * base
    third()
    assert young_threshold() == base


async def test_a_hold_ends_at_its_deadline_and_the_next_create_holds_again() -> None:
    base = young_threshold()
    pacing = GcPacing(hold_seconds=0.05)
    slow = pacing.create_waiting()
    await asyncio.sleep(0.2)
    assert young_threshold() == base, "a create still waiting holds collections back no longer than hold_seconds"
    later = pacing.create_waiting()
    assert young_threshold() == GROWTH_CAP * base
    later()
    assert pacing.holding, "the slow create still waits"
    slow()
    assert young_threshold() == base


async def test_a_young_generation_that_reaches_the_raised_threshold_is_collected_during_a_hold() -> None:
    collections: list[int] = []

    def heard(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(heard)
    try:
        with young_threshold_of(100):
            pacing = GcPacing(hold_seconds=30)
            waiting = pacing.create_waiting()
            kept = [[index] for index in range(150)]  # young container objects, alive: past 100, short of 300
            assert collections == [], "held back past the usual threshold"
            kept += [[index] for index in range(GROWTH_CAP * 100)]
            assert collections, "collected at the raised one"
            waiting()
            assert young_threshold() == 100
    finally:
        gc.callbacks.remove(heard)
    assert len(kept) == 150 + GROWTH_CAP * 100


async def test_a_threshold_set_during_a_hold_is_kept() -> None:
    with young_threshold_of(young_threshold()):  # put back as it was before the hold
        pacing = GcPacing(hold_seconds=30)
        waiting = pacing.create_waiting()
        gc.set_threshold(12_345, *gc.get_threshold()[1:])
        waiting()
        assert young_threshold() == 12_345


async def test_a_collector_turned_off_has_nothing_held_back() -> None:
    with young_threshold_of(0):
        pacing = GcPacing(hold_seconds=30)
        waiting = pacing.create_waiting()
        assert not pacing.holding
        waiting()
        assert young_threshold() == 0


async def test_closing_ends_the_hold_and_takes_no_more() -> None:
    base = young_threshold()
    pacing = GcPacing(hold_seconds=30)
    waiting = pacing.create_waiting()
    pacing.close()
    assert young_threshold() == base
    late = pacing.create_waiting()
    assert not pacing.holding
    for written in (waiting, late):
        written()
    assert young_threshold() == base


# A first token slow enough that a check made at the response's first events lands well inside the wait.
SLOW_FIRST_TOKEN = {"sim_tokens": "3", "sim_token_delay_ms": "5", "sim_ttft_ms": "1000"}


@pytest.fixture
async def holding_gateway(storage_url: str, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    """A gateway whose holds outlast any first token in these tests (only its release can end them)."""
    settings = gateway_settings(
        storage_url=storage_url, simulator_url=simulator_url, key_prefix=key_prefix, server={"gc_hold_seconds": 30}
    )
    async with serve_gateway(settings) as served:
        yield served


def pacing_of(gateway: Gateway) -> GcPacing:
    assert gateway.app is not None
    return gateway.app[GC_PACING]


@pytest.mark.parametrize("storage_url", ["memory", "redis"], indirect=True)
async def test_a_streamed_create_holds_collections_back_until_its_first_output_is_written(
    holding_gateway: Gateway,
) -> None:
    pacing = pacing_of(holding_gateway)
    stream = await holding_gateway.client.responses.create(
        model="sim-1", input="hello", stream=True, metadata=SLOW_FIRST_TOKEN
    )
    seen = []
    async for event in stream:
        seen.append(event.type)
        if event.type in ("response.created", "response.in_progress"):
            assert pacing.holding
        else:  # written only after the first output was, which ended the hold
            assert not pacing.holding, event.type
    assert seen[0] == "response.created"
    assert seen[-1] == "response.completed"


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
async def test_a_client_that_leaves_before_the_first_output_ends_its_hold(holding_gateway: Gateway) -> None:
    pacing = pacing_of(holding_gateway)
    stream = await holding_gateway.client.responses.create(
        model="sim-1", input="hello", stream=True, metadata=SLOW_FIRST_TOKEN
    )
    async for event in stream:
        assert event.type == "response.created"
        break
    assert pacing.holding
    await stream.close()

    async def released() -> bool:
        return not pacing.holding

    await eventually(released, within=5, interval=0.01)


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
async def test_a_create_nobody_streams_holds_nothing_back(holding_gateway: Gateway) -> None:
    pacing = pacing_of(holding_gateway)
    assert holding_gateway.app is not None
    manager = holding_gateway.app[RUN_MANAGER]
    running = asyncio.create_task(
        holding_gateway.client.responses.create(model="sim-1", input="hello", metadata=SLOW_FIRST_TOKEN)
    )

    async def admitted() -> bool:
        return bool(manager.local_runs())

    await eventually(admitted, within=5, interval=0.01)
    assert not pacing.holding  # the run waits for its first token, but no client sees it before the end
    response = await running
    assert response.status == "completed"


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
async def test_a_socket_create_holds_collections_back_until_its_first_output_is_sent(
    holding_gateway: Gateway,
) -> None:
    pacing = pacing_of(holding_gateway)
    async with holding_gateway.client.responses.connect() as connection:
        await connection.response.create(model="sim-1", input="hello socket", metadata=SLOW_FIRST_TOKEN)
        async with asyncio.timeout(20):
            async for event in connection:
                if event.type in ("response.created", "response.in_progress"):
                    assert pacing.holding
                else:
                    assert not pacing.holding, event.type
                if event.type == "response.completed":
                    break
