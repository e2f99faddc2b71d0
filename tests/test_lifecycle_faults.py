"""Fault injection at every boundary between two store steps of a run's life, and the thirteen ways runs used to get
stuck, billed after a cancel or overbooked: each is stopped (or failed) exactly there, and afterwards every response
has ended once, with its index, turn and idempotency key in agreement."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

import runs.event_log
import runs.idempotency
from gateway.state import OWNERSHIP, RUN_MANAGER, STORE
from runs.faults import BOUNDARIES, KILL_AT_ENV, FaultPoints
from storage.base import ResponseMissing, SequenceConflict, Store, StoreUnavailable
from storage.redis import RedisStore
from tests.conftest import Gateway, GatewayProcess, eventually, gateway_settings, redis_gateway_env, serve_gateway
from tests.helpers import sdk_for, sim_requests, sim_stats, upstream_calls
from tests.lifecycle_checks import (
    FaultyStore,
    Freezer,
    assert_settled,
    eventually_settled,
    index_members,
    unavailable,
)

# Short leases, so that a takeover is a matter of seconds: lease + sweep is the bound every test waits for.
FAST_RUNS = {"lease_seconds": 1.5, "renew_seconds": 0.5, "sweep_seconds": 0.3}
TAKEOVER_SECONDS = 12.0


@contextlib.asynccontextmanager
async def instance(
    storage_url: str, simulator_url: str, key_prefix: str, *, faults: FaultPoints | None = None, **runs: Any
) -> AsyncIterator[Gateway]:
    """An in-process gateway with fast leases; `faults` are installed before it starts."""
    settings = gateway_settings(
        storage_url=storage_url,
        simulator_url=simulator_url,
        key_prefix=key_prefix,
        runs={**FAST_RUNS, **runs},
        shutdown={"grace_seconds": 0},
    )
    async with serve_gateway(settings, faults) as served:
        if isinstance(faults, FreezerFaults):
            faults.freezer.app = served.app
        yield served


class FreezerFaults(FaultPoints):
    """Fault points that freeze the instance they are installed in (see Freezer)."""

    def __init__(self, freezer: Freezer) -> None:
        super().__init__(freezer.faults.hooks)
        self.freezer = freezer


def frozen_at(*boundaries: str, only: Callable[[str], bool] | None = None) -> FreezerFaults:
    return FreezerFaults(Freezer(*boundaries, only=only))


async def _calls_are(simulator_url: str, sim_tag: str, count: int) -> bool:
    return await upstream_calls(simulator_url, sim_tag) == count


def store_of(gateway: Gateway) -> Store:
    assert gateway.app is not None
    store: Store = gateway.app[STORE]
    return store


def tag() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def slow(sim_tag: str, tokens: int = 20, delay_ms: int = 30, ttft_ms: int = 5) -> dict[str, str]:
    return {
        "sim_tag": sim_tag,
        "sim_tokens": str(tokens),
        "sim_token_delay_ms": str(delay_ms),
        "sim_ttft_ms": str(ttft_ms),
    }


async def background(client: openai.AsyncOpenAI, sim_tag: str, **extra: Any) -> str:
    response = await client.responses.create(
        model="sim-1", input=f"hello {sim_tag}", background=True, metadata=slow(sim_tag), **extra
    )
    return response.id


async def _abandon(request: asyncio.Future[Any]) -> None:
    """Give up a client request to a frozen instance (it will never answer)."""
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await request


# -- every boundary: a process stopped there leaves nothing stuck ----------------------------------------------


# Boundaries every background conversation turn meets (the others have tests of their own below).
_EVERY_TURN_MEETS = [
    b for b in BOUNDARIES if b not in ("admit.key_claimed", "cancel.flagged", "run.compacting", "run.compacted")
]


@pytest.mark.parametrize("boundary", _EVERY_TURN_MEETS)
async def test_a_gateway_stopped_at_any_boundary_leaves_nothing_stuck(
    boundary: str, shared_redis_url: str, simulator_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background conversation turn with an Idempotency-Key on A; A stops dead at `boundary`; B (started only
    then, so it cannot race A to the boundary) finishes it within lease + sweep, and the conversation, the key and
    the index agree with its end."""
    faults = frozen_at(boundary)
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults, max_concurrent=1) as a:
        conversation = await a.client.conversations.create()
        if boundary == "start.claimed":
            # A starts a queued response itself once its only slot frees: fill the slot first.
            await background(a.client, tag())
        creating = asyncio.ensure_future(
            a.client.responses.create(
                model="sim-1",
                input="hello",
                background=True,
                conversation=conversation.id,
                metadata=slow(sim_tag),
                extra_headers={"Idempotency-Key": sim_tag},
            )
        )
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            events = await eventually_settled(
                store_of(b),
                response_id,
                within=TAKEOVER_SECONDS,
                conversation_id=conversation.id,
                idempotency=("default", sim_tag),
            )
            final = events[-1]["response"]
            items = [item async for item in b.client.conversations.items.list(conversation.id, order="asc")]
            if final["status"] == "completed":
                assert [item.type for item in items] == ["message", "message"]  # the turn's input and output, once
            else:
                assert items == []
            if boundary in ("admit.created", "admit.turn_taken", "start.claimed"):
                assert final["status"] == "completed"  # no output yet: restarted, not failed
                assert await upstream_calls(simulator_url, sim_tag) == 1
            if boundary == "run.output":
                assert final["status"] == "failed"  # output had begun: never re-run (it would bill twice)
                assert await upstream_calls(simulator_url, sim_tag) == 1
            # The conversation takes a new turn at once: nothing holds it.
            follow_up = await b.client.responses.create(model="sim-1", input="again", conversation=conversation.id)
            assert follow_up.status == "completed"
        await _abandon(creating)


_COMPACT_FIRST: Any = [{"type": "compaction", "compact_threshold": 1}]


@pytest.mark.parametrize("boundary", ["run.compacting", "run.compacted"])
async def test_a_gateway_stopped_while_compacting_a_turn_leaves_it_ended_once(
    boundary: str, shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """A stops dead while its run compacts the context (before, or after, the compaction is stored): B ends the
    response `failed` (its output had begun, so it is never re-run), its conversation turn is free, and the
    compacted context was never sent to the model."""
    faults = frozen_at(boundary)
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        conversation = await a.client.conversations.create(items=[{"role": "user", "content": "earlier"}])
        creating = asyncio.ensure_future(
            a.client.responses.create(
                model="sim-1",
                input="hello",
                background=True,
                conversation=conversation.id,
                metadata=slow(sim_tag),
                context_management=_COMPACT_FIRST,
            )
        )
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            events = await eventually_settled(
                store_of(b), response_id, within=TAKEOVER_SECONDS, conversation_id=conversation.id
            )
            final = events[-1]["response"]
            assert final["status"] == "failed"
            assert final["output"][0]["type"] == "compaction"
            assert await upstream_calls(simulator_url, sim_tag) == 0  # the turn's own model call never went out
            follow_up = await b.client.responses.create(model="sim-1", input="again", conversation=conversation.id)
            assert follow_up.status == "completed"
        await _abandon(creating)


async def test_a_turn_cancelled_while_compacting_ends_cancelled_and_never_calls_the_model(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    held = asyncio.Event()

    async def hold(boundary: str, response_id: str) -> None:
        held.set()
        await asyncio.sleep(30)  # a long summary call

    faults = FaultPoints({"run.compacting": hold})
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        response = await a.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=slow(sim_tag), context_management=_COMPACT_FIRST
        )
        await asyncio.wait_for(held.wait(), 10)
        cancelled = await a.client.responses.cancel(response.id)
        assert cancelled.status == "cancelled"
        events = await assert_settled(store_of(a), response.id, status="cancelled")
        assert [event["type"] for event in events][2:4] == [
            "response.output_item.added",
            "response.compaction.compacting",
        ]
        assert await upstream_calls(simulator_url, sim_tag) == 0


async def test_a_key_claimed_by_a_dead_admission_is_taken_over(
    shared_redis_url: str, simulator_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stops right after claiming an Idempotency-Key, before its response exists: nothing is stored, and a retry
    on B takes the abandoned claim over (after ABANDONED_CLAIM_MS) and runs once."""
    monkeypatch.setattr(runs.idempotency, "ABANDONED_CLAIM_MS", 1000)
    faults = frozen_at("admit.key_claimed")
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        body: dict[str, Any] = {"model": "sim-1", "input": "hi", "metadata": slow(sim_tag)}
        headers = {"Idempotency-Key": sim_tag}
        creating = asyncio.ensure_future(a.client.responses.create(**body, extra_headers=headers))
        dead_id = await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            assert await store_of(b).get_response(dead_id) is None
            await asyncio.sleep(1.1)
            retried = await b.client.responses.create(**body, extra_headers=headers)
            assert retried.status == "completed"
            await assert_settled(store_of(b), retried.id, idempotency=("default", sim_tag))
            assert await upstream_calls(simulator_url, sim_tag) == 1
        await _abandon(creating)


# -- the thirteen scenarios ---------------------------------------------------------------------------------------


async def test_1_a_response_is_never_stored_unindexed(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 1 (queued forever): the response and its index entry are one step, so a sweeper looking right after
    the create finds it indexed; stopped there, it still runs."""
    faults = frozen_at("admit.created")
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        creating = asyncio.ensure_future(background(a.client, sim_tag))
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        index, queue = await index_members(store_of(a))
        assert response_id in index | queue
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            await eventually_settled(store_of(b), response_id, within=TAKEOVER_SECONDS, status="completed")
        await _abandon(creating)


@pytest.mark.parametrize("refusal", ["conflict", "unavailable"])
async def test_2_a_refused_terminal_write_is_never_settled_from_memory(
    refusal: str, storage_url: str, simulator_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario 2: the store refuses the terminal append (a sequence conflict after a failover, or unreachable
    past the write retry). The run must not settle from its memory (turn ended `completed` with its items while the
    stored status stays in_progress): it releases its lease, and the sweeper ends it from what is stored — failed,
    with the partial output, one terminal event — and only then settles."""
    monkeypatch.setattr(runs.event_log, "WRITE_RETRY_SECONDS", 0.3)
    refusing = [True]

    def refuse_terminal(response_id: str, events: Any, **kwargs: Any) -> BaseException | None:
        if kwargs["status"] != "completed" or not refusing[0]:
            return None
        if refusal == "conflict":
            refusing[0] = False
            return SequenceConflict("injected: the log moved on (a failover)")
        return StoreUnavailable("injected: store unreachable")

    def wrap(store: Store) -> Store:
        faulty = FaultyStore(store)
        faulty.fail["append_events"] = refuse_terminal
        return faulty  # type: ignore[return-value]

    async with instance(storage_url, simulator_url, key_prefix, faults=FaultPoints(wrap_store=wrap)) as a:
        conversation = await a.client.conversations.create()
        created = await a.client.responses.create(
            model="sim-1", input="hi", background=True, conversation=conversation.id, metadata=slow(tag(), 5, 5)
        )
        if refusal == "unavailable":
            await asyncio.sleep(1.0)  # past the write retry
            refusing[0] = False  # the store is reachable again
        events = await eventually_settled(
            store_of(a), created.id, within=TAKEOVER_SECONDS, conversation_id=conversation.id, status="failed"
        )
        assert events[-1]["response"]["output"]  # the partial output is kept
        assert [item async for item in a.client.conversations.items.list(conversation.id)] == []  # failed: nothing
        assert (await a.client.responses.retrieve(created.id)).status == "failed"


class RefusesBegunAppends(FaultyStore):
    """The real store, but every append a run begins without waiting (a delta's) is refused: the response is gone,
    as if deleted under the run."""

    begins_appends = True  # whatever the store under it (a cluster's declines): this one begins every append

    def start_append(
        self, response_id: str, events: Any, *, lease: Any, done: Callable[[Exception | None], None]
    ) -> bool:
        asyncio.get_running_loop().call_soon(done, ResponseMissing(response_id))
        return True


async def test_a_refused_delta_stops_a_silent_provider_call_at_once(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    """The run begins a delta's append and goes back to reading its provider, which then sends nothing for a
    minute: the append's refusal stops the provider call when the refusal comes, not at the provider's next
    token, and the run ends. (The response is not really gone, so a sweep later resumes it, into the same
    refusal: only the first call matters here.)"""
    sim_tag = tag()

    def wrap(store: Store) -> Store:
        return RefusesBegunAppends(store)  # type: ignore[return-value]

    async with instance(storage_url, simulator_url, key_prefix, faults=FaultPoints(wrap_store=wrap)) as a:
        created = await a.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=slow(sim_tag, tokens=5, delay_ms=60_000)
        )
        run = a.app[RUN_MANAGER].local_run(created.id)
        assert run is not None

        async def provider_call_closed() -> bool:
            return bool((await sim_stats(simulator_url))["disconnects_by_tag"].get(sim_tag, 0) >= 1)

        await eventually(provider_call_closed, within=10)  # the next token is a minute away
        await asyncio.wait_for(run.wait_finished(), 10)


async def test_3_an_unresumable_response_ends_failed_and_the_sweep_goes_on(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 3: an orphan whose conversation was deleted cannot be resumed. It ends failed with a clear error
    (once), its turn is gone with its conversation, and the rest of the sweep batch is taken over as usual."""
    faults = frozen_at("admit.turn_taken")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        doomed_conversation = await a.client.conversations.create()
        kept_conversation = await a.client.conversations.create()
        first = asyncio.ensure_future(
            a.client.responses.create(
                model="sim-1", input="hi", background=True, conversation=doomed_conversation.id, metadata=slow(tag())
            )
        )
        doomed_id = await asyncio.wait_for(faults.freezer.reached, 20)
        # A is frozen for every turn from now on: the second orphan is frozen at the same boundary.
        faults.freezer.reached = asyncio.get_running_loop().create_future()
        second = asyncio.ensure_future(
            a.client.responses.create(
                model="sim-1", input="hi", background=True, conversation=kept_conversation.id, metadata=slow(tag())
            )
        )
        kept_id = await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            await b.client.conversations.delete(doomed_conversation.id)
            events = await eventually_settled(store_of(b), doomed_id, within=TAKEOVER_SECONDS, status="failed")
            error = events[-1]["response"]["error"]
            assert "could not be resumed" in error["message"]
            assert "not found" in error["message"].lower()
            await eventually_settled(
                store_of(b), kept_id, within=TAKEOVER_SECONDS, conversation_id=kept_conversation.id, status="completed"
            )
        await _abandon(first)
        await _abandon(second)


async def test_3_a_model_no_longer_routed_ends_failed(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 3: the instance that takes over no longer routes the orphan's model: failed, once, not re-claimed
    every lease period."""
    faults = frozen_at("admit.created")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        creating = asyncio.ensure_future(background(a.client, tag()))
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        settings = gateway_settings(
            storage_url=shared_redis_url, simulator_url=simulator_url, key_prefix=key_prefix, runs=FAST_RUNS
        )
        settings.upstreams[0].models = ["other-*"]
        async with serve_gateway(settings) as b:
            events = await eventually_settled(store_of(b), response_id, within=TAKEOVER_SECONDS, status="failed")
            assert "sim-1" in events[-1]["response"]["error"]["message"]
            await asyncio.sleep(2.0)  # several lease periods: still exactly one terminal event
            await assert_settled(store_of(b), response_id, status="failed")
        await _abandon(creating)


async def test_4_cancelling_a_queued_response_ends_it_at_once_and_never_upstream(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 4: a queued response nobody owns is cancelled by whoever receives the cancel, at once: cancelled,
    one terminal event, never sent upstream (also not later, when capacity frees)."""
    async with instance(storage_url, simulator_url, key_prefix, max_concurrent=1) as a:
        busy_tag, queued_tag = tag(), tag()
        busy = await a.client.responses.create(
            model="sim-1", input="busy", background=True, metadata=slow(busy_tag, 20, 30)
        )
        queued = await a.client.responses.create(
            model="sim-1", input="wait", background=True, metadata=slow(queued_tag)
        )
        assert queued.status == "queued"
        started = time.monotonic()
        cancelled = await a.client.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        assert time.monotonic() - started < 5  # not the 10 s wait for an owner that does not exist
        await assert_settled(store_of(a), queued.id, status="cancelled")
        await eventually_settled(store_of(a), busy.id, status="completed")
        await asyncio.sleep(1.0)  # the slot is free: the sweeper would have started it by now
        assert await upstream_calls(simulator_url, queued_tag) == 0
        await assert_settled(store_of(a), queued.id, status="cancelled")
        again = await a.client.responses.cancel(queued.id)  # cancelling twice returns the same object
        assert again.status == "cancelled"


async def test_4_a_cancel_stored_while_its_owner_dies_still_ends_it(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """The instance that stored the cancel request stops right there; the owner's next renewal (or whoever takes
    it over) reads the request: cancelled, once."""
    faults = frozen_at("cancel.flagged")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        sim_tag = tag()
        response = await a.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=slow(sim_tag, 200, 50)
        )
        cancelling = asyncio.ensure_future(a.client.responses.cancel(response.id))
        await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            await eventually_settled(store_of(b), response.id, within=TAKEOVER_SECONDS, status="cancelled")
        await _abandon(cancelling)


async def test_4_a_running_response_hears_the_cancel_during_a_long_first_token(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """A cancel sent to B for a run on A that waits 30 s for its first token: A stops the upstream call within a
    second (the notice), or at its next renewal if the notice is lost."""
    async with (
        instance(shared_redis_url, simulator_url, key_prefix) as a,
        instance(shared_redis_url, simulator_url, key_prefix) as b,
    ):
        sim_tag = tag()
        response = await a.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=slow(sim_tag, 5, 5, ttft_ms=30_000)
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        cancelled = await b.client.responses.cancel(response.id)
        assert cancelled.status == "cancelled"
        assert time.monotonic() - started < 2
        await assert_settled(store_of(b), response.id, status="cancelled")


async def test_4_the_renewal_carries_a_cancel_whose_notice_was_lost(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """The cancel flag alone (no pub/sub notice, as when the subscriber was reconnecting) reaches a run waiting for
    its first token through its lease renewal."""
    async with instance(shared_redis_url, simulator_url, key_prefix) as a:
        response = await a.client.responses.create(
            model="sim-1", input="hi", background=True, metadata=slow(tag(), 5, 5, ttft_ms=30_000)
        )
        store = store_of(a)
        state = store.keys.response_state(response.id)  # type: ignore[attr-defined]
        await store._client.hset(state, "cancel_requested", "1")  # type: ignore[attr-defined]
        await eventually_settled(store, response.id, within=5, status="cancelled")


async def test_5_capacity_is_never_overbooked_and_the_queue_is_fifo(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 5 and 6: `runs.max_concurrent: 1`, 10 concurrent POSTs over two instances: never more than one run
    in flight per instance; queued responses start in admission order."""
    async with (
        instance(shared_redis_url, simulator_url, key_prefix, max_concurrent=1) as a,
        instance(shared_redis_url, simulator_url, key_prefix, max_concurrent=1) as b,
    ):
        managers = [a.app[RUN_MANAGER], b.app[RUN_MANAGER]]  # type: ignore[index]
        peak = [0, 0]
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                for index, manager in enumerate(managers):
                    peak[index] = max(peak[index], manager.active_count, manager._slots.taken)
                await asyncio.sleep(0.002)

        sampler = asyncio.ensure_future(sample())
        burst_tag = tag()
        clients = [a.client, b.client]
        ids = await asyncio.gather(
            *(
                clients[i % 2].responses.create(
                    model="sim-1", input=f"burst {i}", background=True, metadata=slow(burst_tag, 5, 10)
                )
                for i in range(10)
            )
        )
        for response in ids:
            await eventually_settled(store_of(a), response.id, within=30, status="completed")
        # Admission order: one at a time, each admitted before the next is sent.
        order_tag = tag()
        admitted = []
        for i in range(6):
            response = await clients[i % 2].responses.create(
                model="sim-1", input=f"order {i}", background=True, metadata=slow(order_tag, 5, 10)
            )
            admitted.append(f"order {i}")
        for response in ids:
            await eventually_settled(store_of(a), response.id, within=30)
        await asyncio.sleep(3)
        stop.set()
        await sampler
        assert peak == [1, 1]
        started = [body["input"] for body in await sim_requests(simulator_url, order_tag)]
        assert [text if isinstance(text, str) else text[0]["content"] for text in started] == admitted


async def test_6_orphans_are_ended_however_long_the_queue(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 6: B is full and has a long queue; an orphan that had begun answering still ends within lease +
    sweep (ending it needs no run slot)."""
    faults = frozen_at("run.output")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        creating = asyncio.ensure_future(background(a.client, tag()))
        orphan_id = await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix, max_concurrent=1) as b:
            await b.client.responses.create(model="sim-1", input="long", background=True, metadata=slow(tag(), 400, 50))
            for _ in range(20):
                queued = await b.client.responses.create(
                    model="sim-1", input="q", background=True, metadata=slow(tag())
                )
                assert queued.status == "queued"
            await eventually_settled(store_of(b), orphan_id, within=TAKEOVER_SECONDS, status="failed")
        await _abandon(creating)


async def test_7_a_dead_instances_store_false_response_is_discarded_not_rerun(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 7: a `store=false` response's client left with its instance: nobody would read a re-run. The
    sweeper discards it (no upstream call, no keys left) instead of resuming it."""
    faults = frozen_at("admit.created")
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        creating = asyncio.ensure_future(
            a.client.responses.create(model="sim-1", input="hi", store=False, metadata=slow(sim_tag))
        )
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        # A's own call, sent alongside the create (runs/upstream/head_start.py), dies with A; B makes none.
        await eventually(lambda: _calls_are(simulator_url, sim_tag, 1))
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            store = store_of(b)

            async def gone() -> bool:
                index, queue = await index_members(store)
                return await store.get_response(response_id) is None and response_id not in index | queue

            deadline = time.monotonic() + TAKEOVER_SECONDS
            while not await gone():
                assert time.monotonic() < deadline, "the dead instance's store=false response is still there"
                await asyncio.sleep(0.1)
            assert await upstream_calls(simulator_url, sim_tag) == 1
        await _abandon(creating)


async def test_8_a_resumed_run_takes_its_turn(shared_redis_url: str, simulator_url: str, key_prefix: str) -> None:
    """Scenario 8: a conversation turn restarted by another instance holds the turn while it runs (a new turn
    meanwhile is 409) and appends its items once when it completes."""
    faults = frozen_at("admit.turn_taken")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        conversation = await a.client.conversations.create()
        creating = asyncio.ensure_future(
            a.client.responses.create(
                model="sim-1",
                input="hi",
                background=True,
                conversation=conversation.id,
                metadata=slow(tag(), 40, 50),
            )
        )
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            store = store_of(b)
            deadline = time.monotonic() + TAKEOVER_SECONDS
            while (record := await store.get_response(response_id)) is not None and record.owner != b.app[
                RUN_MANAGER
            ].settings.instance_id:  # type: ignore[index]
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            with pytest.raises(openai.ConflictError):
                await b.client.responses.create(model="sim-1", input="cut in", conversation=conversation.id)
            await eventually_settled(
                store, response_id, within=TAKEOVER_SECONDS, conversation_id=conversation.id, status="completed"
            )
            items = [item async for item in b.client.conversations.items.list(conversation.id, order="asc")]
            assert len(items) == 2
        await _abandon(creating)


async def test_8_an_undo_that_first_fails_still_leaves_nothing(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 8: a keyed request refused after its response was stored (the conversation is busy) is undone in
    one step, retried while the store is unreachable: no response the client was told failed is left to run, and
    its key is free for a retry."""
    wrapped: list[FaultyStore] = []

    def wrap(store: Store) -> Store:
        faulty = FaultyStore(store)
        faulty.fail["abandon_admission"] = unavailable(2)
        wrapped.append(faulty)
        return faulty  # type: ignore[return-value]

    async with instance(storage_url, simulator_url, key_prefix, faults=FaultPoints(wrap_store=wrap)) as a:
        conversation = await a.client.conversations.create()
        holder = await a.client.responses.create(
            model="sim-1", input="first", background=True, conversation=conversation.id, metadata=slow(tag(), 30, 30)
        )
        sim_tag = tag()
        body: dict[str, Any] = {
            "model": "sim-1",
            "input": "second",
            "background": True,
            "conversation": conversation.id,
            "metadata": slow(sim_tag),
        }
        with pytest.raises(openai.ConflictError):
            await a.client.responses.create(**body, extra_headers={"Idempotency-Key": sim_tag})
        assert wrapped[0].calls["abandon_admission"] == 3
        index, queue = await index_members(store_of(a))
        assert index | queue <= {holder.id}
        await eventually_settled(store_of(a), holder.id, conversation_id=conversation.id, status="completed")
        retried = await a.client.responses.create(**body, extra_headers={"Idempotency-Key": sim_tag})
        await eventually_settled(store_of(a), retried.id, conversation_id=conversation.id, status="completed")
        assert await upstream_calls(simulator_url, sim_tag) == 1


async def test_9_a_hung_sweeper_holds_up_no_takeover(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 9: A hangs in the middle of a sweep (it has claimed an orphan). B takes over another orphan at
    once, and A's claimed one when A's claim lapses: no fleet-wide lock outlives a hung holder."""
    killer = frozen_at("admit.created")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=killer) as dead:
        orphans = []
        for _ in range(2):
            killer.freezer.reached = asyncio.get_running_loop().create_future()
            creating = asyncio.ensure_future(background(dead.client, tag()))
            orphans.append((await asyncio.wait_for(killer.freezer.reached, 20), creating))
        first, second = orphans[0][0], orphans[1][0]
        hung = frozen_at("start.claimed", only=lambda response_id: response_id == first)
        async with instance(shared_redis_url, simulator_url, key_prefix, faults=hung):
            claimed = await asyncio.wait_for(hung.freezer.reached, TAKEOVER_SECONDS)
            assert claimed == first
            async with instance(shared_redis_url, simulator_url, key_prefix) as b:
                await eventually_settled(store_of(b), second, within=TAKEOVER_SECONDS, status="completed")
                await eventually_settled(store_of(b), first, within=TAKEOVER_SECONDS, status="completed")
        for _, creating in orphans:
            await _abandon(creating)


async def test_11_a_synchronous_caller_gets_the_real_outcome_after_a_lost_lease(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """Scenario 11: A's lease lapses (its keeper stops) while it serves a synchronous request; B takes the
    response over. The caller waiting on A gets the stored outcome with a 200 — not a 503 its SDK would retry into
    a second run."""
    sim_tag = tag()
    async with instance(shared_redis_url, simulator_url, key_prefix) as a:
        asking = asyncio.ensure_future(
            a.http.post(
                "/v1/responses",
                json={"model": "sim-1", "input": "hi", "metadata": slow(sim_tag, 80, 50)},
            )
        )
        await asyncio.sleep(0.5)
        for task in a.app[OWNERSHIP]._tasks:  # type: ignore[index]
            task.cancel()  # A stops renewing: to the fleet it is dead, though its run goes on
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            reply: aiohttp.ClientResponse = await asyncio.wait_for(asking, 30)
            body = await reply.json()
            assert reply.status == 200, body
            record = await store_of(b).get_response(body["id"])
            assert record is not None
            assert body["status"] == record.status == "failed"  # output had begun: ended by B, not re-run
            assert await upstream_calls(simulator_url, sim_tag) == 1


@pytest.mark.parametrize("kind", ["sync", "sync_keyed", "sync_stream"])
async def test_11_a_dead_instances_synchronous_response_runs_again_only_if_someone_can_read_it(
    kind: str, shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """A synchronous non-streaming client learns its response's id only from the answer: once its instance dies,
    nobody can read a re-run, and its own retry would be a second run. So the orphan ends failed without an
    upstream call — unless an Idempotency-Key retry can replay it, or a streaming client can reattach by the id it
    already has: those are restarted."""
    faults = frozen_at("admit.created")
    sim_tag = tag()
    body: dict[str, Any] = {"model": "sim-1", "input": "hi", "metadata": slow(sim_tag)}
    if kind == "sync_stream":
        body["stream"] = True
    headers = {"Idempotency-Key": sim_tag} if kind == "sync_keyed" else {}
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        creating = asyncio.ensure_future(a.http.post("/v1/responses", json=body, headers=headers))
        response_id = await asyncio.wait_for(faults.freezer.reached, 20)
        # A's own provider call went out alongside the create (runs/upstream/head_start.py), so it dies with A:
        # counted first, so that what follows counts only B's.
        await eventually(lambda: _calls_are(simulator_url, sim_tag, 1))
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            expected = "failed" if kind == "sync" else "completed"
            events = await eventually_settled(store_of(b), response_id, within=TAKEOVER_SECONDS, status=expected)
            assert await upstream_calls(simulator_url, sim_tag) == (1 if kind == "sync" else 2)
            if kind == "sync":
                assert "not run again" in events[-1]["response"]["error"]["message"]
            if kind == "sync_keyed":
                replayed = await b.client.responses.create(**body, extra_headers=headers)
                assert (replayed.id, replayed.status) == (response_id, "completed")
        await _abandon(creating)


async def test_a_real_process_killed_between_the_end_and_its_follow_ups(
    start_gateway_process: Callable[..., GatewayProcess], shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """A real gateway process SIGKILLs itself (GATEWAY_FAULT_KILL_AT) right after a conversation turn's terminal
    event is stored, before its follow-ups: another process settles it from what is stored — the turn released,
    its items appended once, the response out of the run index — and the conversation goes on."""
    fast = {f"GATEWAY_RUNS__{name.upper()}": str(value) for name, value in FAST_RUNS.items()}
    env = redis_gateway_env(shared_redis_url, simulator_url, key_prefix, **fast)
    a = start_gateway_process({**env, KILL_AT_ENV: "finish.terminal_stored"})
    b = start_gateway_process(env)
    client_a, client_b = sdk_for(a.url), sdk_for(b.url)
    conversation = await client_a.conversations.create()
    created = await client_a.responses.create(
        model="sim-1", input="hi", background=True, conversation=conversation.id, metadata=slow(tag(), 5, 5)
    )
    a.process.wait(timeout=20)
    assert a.process.returncode == -signal.SIGKILL
    assert "fault injection: killing this process at finish.terminal_stored" in a.log()
    store = RedisStore.from_url(shared_redis_url, key_prefix=key_prefix, retention_seconds=600)
    try:
        await eventually_settled(
            store, created.id, within=TAKEOVER_SECONDS, conversation_id=conversation.id, status="completed"
        )
    finally:
        await store.close()
    items = [item async for item in client_b.conversations.items.list(conversation.id, order="asc")]
    assert len(items) == 2
    follow_up = await client_b.responses.create(model="sim-1", input="again", conversation=conversation.id)
    assert follow_up.status == "completed"
    await client_a.close()
    await client_b.close()


async def test_8_a_create_whose_reply_was_lost_is_undone(storage_url: str, simulator_url: str, key_prefix: str) -> None:
    """The create ran but its reply was lost (a timeout, a reset after the script): the client gets an error, and the
    response it was never told about must not run later (its retry would be a second run)."""

    def wrap(store: Store) -> Store:
        faulty = FaultyStore(store)
        inner_create = store.create_response

        async def create_then_lose_the_reply(new: Any) -> Any:
            await inner_create(new)
            raise StoreUnavailable("injected: the reply was lost")

        faulty.create_response = create_then_lose_the_reply  # type: ignore[method-assign]
        return faulty  # type: ignore[return-value]

    sim_tag = tag()
    async with instance(
        storage_url, simulator_url, key_prefix, faults=FaultPoints(wrap_store=wrap), max_concurrent=1
    ) as a:
        with pytest.raises(openai.InternalServerError):
            await a.client.responses.create(model="sim-1", input="hi", background=True, metadata=slow(sim_tag))
        index, queue = await index_members(store_of(a))
        assert index | queue == set()
        await asyncio.sleep(1.0)  # several sweeps
        # The provider call sent alongside the create (runs/upstream/head_start.py), if it got out before the
        # create failed, was dropped then; nothing called the provider again.
        stats = await sim_stats(simulator_url)
        calls = stats["requests_by_tag"].get(sim_tag, 0)
        assert calls == stats["disconnects_by_tag"].get(sim_tag, 0) <= 1


def create_held_until(released: asyncio.Event) -> Callable[[Store], Store]:
    """A store wrapper whose creates wait for `released` before they run."""

    def wrap(store: Store) -> Store:
        faulty = FaultyStore(store)
        inner_create = store.create_response

        async def create_when_released(new: Any) -> Any:
            await released.wait()
            return await inner_create(new)

        faulty.create_response = create_when_released  # type: ignore[method-assign]
        return faulty  # type: ignore[return-value]

    return wrap


async def test_the_provider_is_asked_while_the_create_is_stored_and_heard_only_after(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    """The provider call goes out alongside the create (runs/upstream/head_start.py): while the store has not
    answered, the provider has been asked and has answered in full, and nothing is stored or sent to the client;
    once the create is stored, that same call's answer is the response (no second call), numbered from 0."""
    stored = asyncio.Event()
    wrap = create_held_until(stored)
    sim_tag = tag()
    async with instance(storage_url, simulator_url, key_prefix, faults=FaultPoints(wrap_store=wrap)) as a:
        creating = asyncio.ensure_future(
            a.client.responses.create(
                model="sim-1", input="hi", stream=True, metadata=slow(sim_tag, tokens=3, delay_ms=0, ttft_ms=0)
            )
        )
        await eventually(lambda: _calls_are(simulator_url, sim_tag, 1))
        await asyncio.sleep(0.3)  # the provider's whole answer is in by now
        assert not creating.done()
        assert await index_members(store_of(a)) == (set(), set())
        stored.set()
        stream = await creating
        events = [event async for event in stream]
        assert [event.sequence_number for event in events] == list(range(len(events)))
        assert events[-1].type == "response.completed"
        assert await upstream_calls(simulator_url, sim_tag) == 1


async def test_output_a_provider_sent_before_crashing_while_the_create_was_stored_is_kept(
    storage_url: str, simulator_url: str, key_prefix: str
) -> None:
    """The provider streams some output and crashes while the create is still being stored: the run, reading the
    call only after admission, still gets every event sent before the crash (the call is read meanwhile, not left
    unread: aiohttp drops a failed connection's buffered bytes) and ends failed with that partial output."""
    stored = asyncio.Event()
    wrap = create_held_until(stored)
    sim_tag = tag()
    metadata = {**slow(sim_tag, tokens=20, delay_ms=0, ttft_ms=0), "sim_fail_after": "8"}
    async with instance(storage_url, simulator_url, key_prefix, faults=FaultPoints(wrap_store=wrap)) as a:
        creating = asyncio.ensure_future(
            a.client.responses.create(model="sim-1", input="hi", stream=True, metadata=metadata)
        )
        await eventually(lambda: _calls_are(simulator_url, sim_tag, 1))
        await asyncio.sleep(0.3)  # the provider has sent its 8 events and crashed by now
        stored.set()
        stream = await creating
        events = [event async for event in stream]
        assert events[-1].type == "response.failed"
        deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
        assert len(deltas) == 4, [event.type for event in events]  # events 5-8 of the provider's 8
        assert await upstream_calls(simulator_url, sim_tag) == 1


async def test_deleting_an_ended_response_before_its_follow_ups_releases_its_turn(
    shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    """A client deletes a completed turn while its instance is stopped between the stored end and the follow-ups:
    the follow-ups happen first (its items join the conversation, the turn is released), then the delete."""
    faults = frozen_at("finish.terminal_stored")
    async with instance(shared_redis_url, simulator_url, key_prefix, faults=faults) as a:
        conversation = await a.client.conversations.create()
        created = await a.client.responses.create(
            model="sim-1", input="hi", background=True, conversation=conversation.id, metadata=slow(tag(), 5, 5)
        )
        await asyncio.wait_for(faults.freezer.reached, 20)
        async with instance(shared_redis_url, simulator_url, key_prefix) as b:
            await b.client.responses.delete(created.id)
            record = await store_of(b).get_conversation(conversation.id)
            assert record is not None
            assert record.active_response_id is None
            items = [item async for item in b.client.conversations.items.list(conversation.id)]
            assert len(items) == 2
            added = await b.client.conversations.items.create(
                conversation.id, items=[{"type": "message", "role": "user", "content": "more"}]
            )
            assert len(added.data) == 1
