"""The run lifecycle driven in random order by a hypothesis state machine, against Redis (two instances that crash
and are replaced) and the embedded store: admissions, Idempotency-Key retries, cancels, crashes anywhere between two
store steps, sweeps, conversation deletes. The stored invariants are checked after every step, and at the end every
response must be ended, settled and its turn released."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import runs.idempotency
from runs.conversations import CreateConversationRequest, create_conversation
from runs.errors import ApiError
from runs.faults import BOUNDARIES, FaultPoints
from runs.history import conversation_id_of
from runs.idempotency import IdempotencyKey
from runs.lifecycle import Lifecycle, RunSettings
from runs.manager import RunManager
from runs.ownership import Ownership
from runs.request import ContextManagement, CreateResponseRequest
from runs.run import ResponseRun
from runs.upstream.base import UpstreamSpec
from runs.upstream.router import UpstreamRouter
from storage.base import Store
from storage.keys import KeySpace
from storage.memory import MemoryStore
from storage.redis import RedisStore
from storage.status import TERMINAL_STATUSES
from tests.lifecycle_snapshot import StoreSnapshot, check_quiescent, check_store, memory_snapshot, redis_snapshot

T = TypeVar("T")

LEASE_MS = 250
RENEW_SECONDS = 0.06
SWEEP_SECONDS = 0.15
STEP_SECONDS = 15.0  # a step that takes longer than this is a hang, not slowness
QUIESCE_ROUNDS = 12
KEYS = ("key-a", "key-b", "key-c")
FAULTS = (None, None, None, "error_event", "http_500")


@dataclass(frozen=True)
class Plan:
    """What a create request asks for, and how the simulated model answers it."""

    background: bool
    stored: bool
    conversation: int | None  # which of the conversations (deleted ones too)
    tokens: int
    delay_ms: int
    fault: str | None
    compacts: bool  # context_management with a threshold every input reaches: compaction before the model call


PLANS = st.builds(
    Plan,
    background=st.booleans(),
    stored=st.sampled_from([True, True, True, False]),
    conversation=st.one_of(st.none(), st.integers(0, 7)),
    tokens=st.integers(1, 8),
    delay_ms=st.sampled_from([2, 10, 40]),
    fault=st.sampled_from(FAULTS),
    compacts=st.sampled_from([False, False, False, True]),
)


@dataclass(eq=False)
class Instance:
    """One gateway process: its run manager, its keeper and sweeper, and the requests it is serving."""

    manager: RunManager
    ownership: Ownership
    store: Store
    requests: set[asyncio.Task[Any]] = field(default_factory=set)
    unstored: set[str] = field(default_factory=set)  # the store=false responses it ran for a connection
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    kill_at: str | None = None  # the boundary at which it dies next


class LifecycleMachine(RuleBasedStateMachine):
    """Configured per backend by `machine_for`."""

    backend: ClassVar[str]
    redis_url: ClassVar[str]
    simulator_url: ClassVar[str]
    capacities: ClassVar[tuple[int, ...]]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.router = UpstreamRouter.from_specs(
            [UpstreamSpec(name="sim", kind="responses", base_url=f"{self.simulator_url}/v1", max_retries=0)]
        )
        self.memory = MemoryStore(retention_seconds=600) if self.backend == "memory" else None
        self.reader = redis.Redis.from_url(self.redis_url) if self.backend == "redis" else None
        self.stores: list[Store] = []
        self.instances: list[Instance] = []
        self.crashed: list[Instance] = []
        self.frozen: list[asyncio.Future[None]] = []  # where crashed instances stopped, mid-step
        self.responses: list[str] = []  # every response id an admission named
        self.key_bodies: dict[str, CreateResponseRequest] = {}
        self.key_responses: dict[str, set[str]] = {key: set() for key in KEYS}
        self.connections: dict[str, tuple[Instance, ResponseRun]] = {}  # store=false runs and their clients
        # store=false responses whose instance died before it forgot them (its client still connected, or gone a
        # moment earlier): nobody else does, so once ended their keys stay until the retention TTL.
        self.unforgotten: set[str] = set()
        self.conversations: list[str] = []
        self.failures: list[str] = []  # exceptions of requests nobody waited for, and on the loop
        self.loop.set_exception_handler(self._note_loop_error)

        async def start() -> list[Instance]:
            return [self._start_instance(capacity) for capacity in self.capacities]

        self.instances = self._run(start())
        for _ in range(2):
            self._create_conversation()

    # -- harness -------------------------------------------------------------------------------------------

    def _run(self, work: Awaitable[T], timeout: float = STEP_SECONDS) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):  # in this task, unlike wait_for
                return await work

        return self.loop.run_until_complete(bounded())

    def _new_store(self) -> Store:
        if self.memory is not None:
            return self.memory
        store = RedisStore.from_url(self.redis_url, key_prefix=self.prefix, retention_seconds=600)
        self.stores.append(store)
        return store

    def _start_instance(self, capacity: int) -> Instance:
        """Start an instance on the running loop (it creates its tasks there)."""
        run_settings = RunSettings(
            max_concurrent=capacity,
            lease_ms=LEASE_MS,
            renew_seconds=RENEW_SECONDS,
            sweep_seconds=SWEEP_SECONDS,
            handover=self.memory is None,
            idempotency_ttl_seconds=3600,
        )
        store = self._new_store()
        faults = FaultPoints()
        manager = RunManager(store, self.router, run_settings, lifecycle=Lifecycle(store, run_settings, faults))
        instance = Instance(manager, Ownership(manager, store), store)

        async def at_boundary(boundary: str, response_id: str) -> None:
            if instance.dead.is_set() or instance.kill_at == boundary:
                self._crash(instance)
                await self._freeze()

        faults.set(BOUNDARIES, at_boundary)
        manager.start()
        instance.ownership.start()
        return instance

    async def _freeze(self) -> None:
        """Stop here for good, as a killed process does: no `except` or `finally` of the caller runs."""
        frozen = self.loop.create_future()
        self.frozen.append(frozen)
        await frozen

    def _crash(self, instance: Instance) -> None:
        """SIGKILL, as near as one event loop gets: the instance's loops, requests and runs stop without writing an
        end (a run's events already queued may still land, as from a paused process: the store fences them), and a
        fresh instance with a new id takes its place on the same store."""
        if instance.dead.is_set():
            return
        instance.dead.set()
        instance.kill_at = None
        self.crashed.append(instance)
        position = self.instances.index(instance)
        self.instances[position] = self._start_instance(instance.manager.settings.max_concurrent)
        current = asyncio.current_task()
        for run in instance.manager.local_runs():
            run.abandon()
        listener = instance.manager._notice_listener
        doomed = [*instance.ownership._tasks, *instance.manager._tasks, *instance.requests]
        for task in [*doomed, *([listener] if listener is not None else [])]:
            if task is not current:
                task.cancel()
        self.unforgotten |= instance.unstored
        for response_id, (owner, _) in list(self.connections.items()):
            if owner is instance:
                del self.connections[response_id]

    async def _serve(self, instance: Instance, work: Awaitable[T]) -> tuple[bool, T | None]:
        """Do `work` as a request to `instance`: (False, None) when the instance died before it answered."""
        request = asyncio.ensure_future(work)
        instance.requests.add(request)
        request.add_done_callback(instance.requests.discard)
        died = asyncio.ensure_future(instance.dead.wait())
        await asyncio.wait({request, died}, return_when=asyncio.FIRST_COMPLETED)
        died.cancel()
        if instance.dead.is_set():
            request.add_done_callback(lambda done: done.cancelled() or done.exception())
            return False, None
        return True, request.result()

    def _note_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A crash cancels run tasks that may not have started yet, whose event-log writer then never closes and is
        # garbage collected pending: an artefact of killing a process inside one loop, not an error.
        if "exception" in context:
            self.failures.append(f"{context.get('message')}: {context['exception']!r}")

    def _note_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(repr(task.exception()))

    def _create_conversation(self) -> None:
        store = self.instances[0].store
        created = self._run(create_conversation(store, CreateConversationRequest(), tenant="default"))
        self.conversations.append(created["id"])

    def snapshot(self) -> StoreSnapshot:
        # Read synchronously (a blocking Redis client): no task of the loop moves while the store is read.
        if self.memory is not None:
            return memory_snapshot(self.memory, self.conversations, list(KEYS))
        assert self.reader is not None
        return redis_snapshot(self.reader, KeySpace(self.prefix), self.conversations, list(KEYS))

    # -- rules ---------------------------------------------------------------------------------------------

    def _request(self, plan: Plan, key: str | None = None) -> CreateResponseRequest:
        metadata = {"sim_tokens": str(plan.tokens), "sim_token_delay_ms": str(plan.delay_ms)}
        if plan.fault is not None:
            metadata["sim_fault"] = plan.fault
        conversation_id = None
        if plan.conversation is not None:
            conversation_id = self.conversations[plan.conversation % len(self.conversations)]
        return CreateResponseRequest(
            model="sim",
            input="hello",
            background=plan.background,
            # store=false only for a synchronous request without a key: the API refuses the rest
            store=plan.stored or plan.background or key is not None,
            conversation=conversation_id,
            metadata=metadata,
            context_management=[ContextManagement(type="compaction", compact_threshold=1)] if plan.compacts else None,
        )

    @initialize(plans=st.lists(PLANS, min_size=1, max_size=3))
    def first_admissions(self, plans: list[Plan]) -> None:
        """Start every example with responses running or queued."""
        for position, plan in enumerate(plans):
            self._run(self._admit(self.instances[position % len(self.instances)], self._request(plan), None))

    @rule(which=st.integers(0, 1), plan=PLANS)
    def admit(self, which: int, plan: Plan) -> None:
        """A create request."""
        self._run(self._admit(self.instances[which % len(self.instances)], self._request(plan), None))

    @rule(
        which=st.integers(0, 1), plan=PLANS, key=st.sampled_from(KEYS), new_body=st.sampled_from([False] * 3 + [True])
    )
    def admit_with_key(self, which: int, plan: Plan, key: str, new_body: bool) -> None:
        """A create request with an Idempotency-Key: once used, usually the same body again (a retry), sometimes
        another (refused)."""
        request = self.key_bodies.get(key)
        if request is None or new_body:
            request = self._request(plan, key)
            self.key_bodies.setdefault(key, request)
        self._run(self._admit(self.instances[which % len(self.instances)], request, key))

    @rule(key=st.sampled_from(KEYS), count=st.integers(2, 3))
    def admit_storm(self, key: str, count: int) -> None:
        """The same request with the same Idempotency-Key, at once on every instance."""
        request = self.key_bodies.get(key) or CreateResponseRequest(
            model="sim", input="storm", background=True, metadata={"sim_tokens": "3", "sim_token_delay_ms": "10"}
        )
        self.key_bodies[key] = request

        async def storm() -> None:
            await asyncio.gather(
                *(self._admit(self.instances[i % len(self.instances)], request, key) for i in range(count))
            )

        self._run(storm())

    async def _admit(self, instance: Instance, request: CreateResponseRequest, key: str | None) -> None:
        idempotency = IdempotencyKey.for_request(key, request, ttl_seconds=3600) if key is not None else None
        try:
            answered, admission = await self._serve(instance, instance.manager.admit(request, idempotency=idempotency))
        except ApiError:
            return  # refused (busy conversation, full instance, reused key, ...): nothing to follow
        if not answered or admission is None:
            return
        self.responses.append(admission.response_id)
        if key is not None:
            self.key_responses[key].add(admission.response_id)
        if admission.run is not None and not request.is_stored:
            self.connections[admission.response_id] = (instance, admission.run)
            instance.unstored.add(admission.response_id)

    @rule(which=st.integers(0, 1), pick=st.integers(0, 50), wait=st.booleans(), any_status=st.booleans())
    def cancel(self, which: int, pick: int, wait: bool, any_status: bool) -> None:
        """Cancel a response (usually an active one) from any instance; waited for, or left running while the next
        steps happen."""
        stored = self.snapshot().responses
        active = [rid for rid in self.responses if rid in stored and stored[rid].status not in TERMINAL_STATUSES]
        candidates = self.responses if any_status or not active else active
        if not candidates:
            return
        instance = self.instances[which % len(self.instances)]
        response_id = candidates[pick % len(candidates)]

        async def cancel() -> None:
            with contextlib.suppress(ApiError):
                record = await instance.manager.cancel(response_id)
                assert record.status in TERMINAL_STATUSES, f"cancel of {response_id} returned {record.status}"

        if wait:
            self._run(self._serve(instance, cancel()))
        else:
            request = self.loop.create_task(cancel())
            instance.requests.add(request)
            request.add_done_callback(instance.requests.discard)
            request.add_done_callback(self._note_failure)

    @rule(pick=st.integers(0, 50))
    def client_leaves(self, pick: int) -> None:
        """The client of a connection-owned (store=false) run goes: the run stops and is forgotten."""
        if not self.connections:
            return
        response_id = sorted(self.connections)[pick % len(self.connections)]
        instance, run = self.connections.pop(response_id)

        async def leave() -> None:
            instance.manager.release_connection_owned(run)  # it starts a task: on the loop

        self._run(leave())

    @precondition(lambda self: self.backend == "redis")
    @rule(which=st.integers(0, 1))
    def crash(self, which: int) -> None:
        """SIGKILL an instance now; a fresh one starts in its place."""

        async def crash() -> None:
            self._crash(self.instances[which % len(self.instances)])

        self._run(crash())

    @precondition(lambda self: self.backend == "redis")
    @rule(which=st.integers(0, 1), boundary=st.sampled_from(BOUNDARIES))
    def crash_at(self, which: int, boundary: str) -> None:
        """SIGKILL an instance when it next reaches `boundary` (between two store steps)."""
        self.instances[which % len(self.instances)].kill_at = boundary

    @rule(which=st.integers(0, 1), after_lease=st.booleans())
    def sweep(self, which: int, after_lease: bool) -> None:
        """One sweep on an instance, possibly once every lease taken so far has lapsed."""

        async def sweep() -> None:
            if after_lease:
                await asyncio.sleep(LEASE_MS / 1000 + 0.05)
            instance = self.instances[which % len(self.instances)]
            await self._serve(instance, instance.ownership.sweep_once())

        self._run(sweep())

    @rule(ms=st.sampled_from([0, 20, 100]))
    def pause(self, ms: int) -> None:
        """Let runs, keepers and sweepers go on for a moment."""
        self._run(asyncio.sleep(ms / 1000))

    @rule()
    def runs_finish(self) -> None:
        """Wait until every run of a live instance has stopped."""
        self._run(self._runs_finish())

    async def _runs_finish(self) -> None:
        runs = [run for instance in self.instances for run in instance.manager.local_runs()]
        await asyncio.gather(*(run.wait_finished() for run in runs))

    @rule()
    def new_conversation(self) -> None:
        self._create_conversation()

    @rule(pick=st.integers(0, 7))
    def delete_conversation(self, pick: int) -> None:
        conversation_id = self.conversations[pick % len(self.conversations)]
        self._run(self.instances[0].store.delete_conversation(conversation_id))

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def store_is_consistent(self) -> None:
        assert not self.failures, f"errors on the event loop: {self.failures}"
        snapshot = self.snapshot()
        try:
            check_store(snapshot)
            self._check_runs_and_keys(snapshot)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{snapshot.describe()}") from None

    def _check_runs_and_keys(self, snapshot: StoreSnapshot) -> None:
        for key, named in self.key_responses.items():
            assert len(named) <= 1, f"Idempotency-Key {key} admitted {len(named)} responses: {named}"
            if named:
                assert snapshot.claims.get(key) in named, f"{key} names {snapshot.claims.get(key)}, not {named}"
        for instance in self.instances:
            for run in instance.manager.local_runs():
                stored = snapshot.responses.get(run.response_id)
                if run.finished or run.abandoned or stored is None or stored.status in TERMINAL_STATUSES:
                    continue
                if (stored.owner, stored.epoch) != (run.lease.owner, run.lease.epoch):
                    continue  # taken over elsewhere; this run has not heard yet (its writes are fenced)
                conversation_id = conversation_id_of(run.request)
                if run.request.is_stored and conversation_id in snapshot.turns:
                    holder = snapshot.turns[conversation_id]
                    assert holder == run.response_id, f"{run.response_id} runs in {conversation_id} held by {holder}"

    # -- the end -------------------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._run(self._quiesce(), timeout=60)
        finally:
            self._run(self._close(), timeout=30)
            self.loop.close()
            if self.reader is not None:
                self.reader.close()

    async def _quiesce(self) -> None:
        """Faults off, clients gone, then sweep past the lease until everything has ended and settled."""
        for instance in self.instances:
            instance.kill_at = None
        for instance, run in self.connections.values():
            instance.manager.release_connection_owned(run)
        self.connections.clear()
        snapshot = self.snapshot()
        for _ in range(QUIESCE_ROUNDS):
            await self._runs_finish()
            pending = [task for instance in self.instances for task in (*instance.requests, *instance.manager._tasks)]
            await asyncio.gather(*pending, return_exceptions=True)
            snapshot = self.snapshot()
            with contextlib.suppress(AssertionError):
                check_quiescent(snapshot, self.unforgotten)
                break
            await asyncio.sleep(LEASE_MS / 1000 + 0.05)
            for instance in self.instances:
                await instance.ownership.sweep_once()
        try:
            check_quiescent(snapshot, self.unforgotten)
        except AssertionError as error:
            raise AssertionError(
                f"not quiescent after {QUIESCE_ROUNDS} sweeps: {error}\n{snapshot.describe()}"
            ) from None
        assert not self.failures, f"errors on the event loop: {self.failures}"

    async def _close(self) -> None:
        for frozen in self.frozen:
            frozen.cancel()
        for instance in [*self.instances, *self.crashed]:
            await instance.ownership.close()
            await instance.manager.close()
            for request in instance.requests:
                request.cancel()
            await asyncio.gather(*instance.requests, return_exceptions=True)
        leftovers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await self.router.close()
        for store in self.stores:
            await store.close()


def machine_for(backend: str, redis_url: str, simulator_url: str) -> type[LifecycleMachine]:
    capacities = (1, 2) if backend == "redis" else (2,)
    attributes = {"backend": backend, "redis_url": redis_url, "simulator_url": simulator_url, "capacities": capacities}
    return type(f"LifecycleMachine_{backend}", (LifecycleMachine,), attributes)


@pytest.fixture
def quick_claim_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry whose key's first admission died before creating the response waits 5 s for it, then gets 409; the
    outcome is the same after a moment, and the examples stay fast."""
    monkeypatch.setattr(runs.idempotency, "CLAIM_WAIT_SECONDS", 0.2)


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("quick_claim_wait")
@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_lifecycle_state_machine(backend: str, redis_server: str, simulator_url: str) -> None:
    # pytest-asyncio runs in auto mode, so this test is synchronous: each example owns its event loop.
    # Derandomized: the same programs every run (their timing still varies, so a failure may not repeat exactly).
    budget = settings(
        max_examples=20,
        stateful_step_count=35,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    run_state_machine_as_test(machine_for(backend, redis_server, simulator_url), settings=budget)
