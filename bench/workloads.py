"""The four workloads, driven with the official openai SDK (`AsyncOpenAI`, `max_retries=0`) over loopback.

(a) `concurrency`: N concurrent streams at a model's pace; TTFT and the delays between consecutive text deltas.
(b) `ceiling`: K streams from a simulator at full speed for a fixed time; events/s and CPU per event.
(c) `replay`: one finished 10,000-event response streamed again by `GET /v1/responses/{id}?stream=true`.
(d) `memory`: RSS of a fresh gateway idle, then with 1,000 background runs in flight and nobody listening.

Every workload is bounded in time: what has not finished by its deadline is cancelled and counted as a timeout.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

from bench import procs

MODEL = "sim-1"
DELTA = "response.output_text.delta"
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
# Events of one simulated response besides its text deltas: created, in_progress, item added, part added,
# text done, part done, item done, completed.
FRAMING_EVENTS = 8


@dataclass(frozen=True)
class Target:
    """Where the clients send their requests."""

    name: str  # "direct", "gateway", "litellm"
    base_url: str  # ends in /v1
    pid: int | None  # the process whose CPU is this target's cost (None: nothing between client and model)
    background: bool  # send background=True (only the gateway has background runs)
    knob_headers: bool = False  # also send the simulator knobs as x-sim-* headers (for proxies that drop metadata)


@dataclass(frozen=True)
class Knobs:
    """Simulator pace for one request, sent as `metadata` (string values)."""

    tokens: int
    token_delay_ms: float
    ttft_ms: float

    def metadata(self) -> dict[str, str]:
        return {
            "sim_tokens": str(self.tokens),
            "sim_token_delay_ms": f"{self.token_delay_ms:g}",
            "sim_ttft_ms": f"{self.ttft_ms:g}",
        }

    def headers(self) -> dict[str, str]:
        return {f"x-{key.replace('_', '-')}": value for key, value in self.metadata().items()}


@dataclass(frozen=True)
class Observed:
    """The processes whose CPU every workload samples."""

    simulator_pid: int
    redis_pid: int
    simulator_url: str


def make_client(target: Target, timeout: float = 300.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=target.base_url,
        api_key="bench-unused",
        max_retries=0,
        timeout=openai.Timeout(timeout, connect=30.0),
    )


def error_label(error: BaseException) -> str:
    """A short, countable description of a failure."""
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error.message)[:120]}"
    if isinstance(error, openai.APITimeoutError):
        return "client timeout"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        return f"connection error: {type(cause).__name__ if cause else error.message}"
    if isinstance(error, TimeoutError | asyncio.CancelledError):
        return "workload deadline"
    return f"{type(error).__name__}: {str(error)[:120]}"


class CpuWindow:
    """CPU seconds used by a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self._t0 = 0.0
        self._busy0 = 0.0

    def _sample(self) -> dict[str, float]:
        # Only a proxy's own workers count as its children; the bench client's children are the processes under
        # test, and the simulator and Redis have none.
        return {name: procs.cpu_seconds(pid, with_children=name == "target") for name, pid in self._pids.items()}

    def start(self) -> None:
        self._start = self._sample()
        self._busy0 = procs.machine_busy_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        end = self._sample()
        self.used = {name: end[name] - self._start[name] for name in end}
        # Whatever else ran on the machine meanwhile (another benchmark, a test suite) disturbs the numbers.
        busy = procs.machine_busy_seconds() - self._busy0
        self.used["others"] = max(busy - sum(self.used.values()), 0.0)


def _cpu_pids(target: Target, observed: Observed) -> dict[str, int | None]:
    """The processes to sample: "target" is the proxy (None for direct), "client" this process."""
    return {
        "target": target.pid,
        "simulator": observed.simulator_pid,
        "redis": observed.redis_pid,
        "client": os.getpid(),
    }


# --- (a) concurrency ---------------------------------------------------------------------------------------------


@dataclass
class StreamRecord:
    """What one client saw on one stream (filled in as events arrive, so a cancelled stream keeps its data)."""

    started: float = 0.0
    first_delta: float | None = None
    last_delta: float | None = None
    ended: float | None = None
    deltas: int = 0
    events: int = 0
    gaps: list[float] = field(default_factory=list)
    terminal: str | None = None
    status: str | None = None
    error: str | None = None


async def _one_stream(
    client: openai.AsyncOpenAI,
    target: Target,
    knobs: Knobs,
    record: StreamRecord,
    label: str,
    stop_at: float | None = None,
    on_event: Callable[[float], None] | None = None,
) -> None:
    """One `client.responses.create(..., stream=True)` read to its end (or to `stop_at`)."""
    extra: dict[str, Any] = {"background": True} if target.background else {}
    if target.knob_headers:
        extra["extra_headers"] = knobs.headers()
    record.started = time.perf_counter()
    try:
        stream = await client.responses.create(
            model=MODEL, input=label, stream=True, metadata=knobs.metadata(), **extra
        )
        try:
            async for event in stream:
                now = time.perf_counter()
                if stop_at is not None and now >= stop_at:
                    break
                record.events += 1
                if on_event is not None:
                    on_event(now)
                kind = event.type
                if kind == DELTA:
                    record.deltas += 1
                    if record.last_delta is None:
                        record.first_delta = now
                    else:
                        record.gaps.append(now - record.last_delta)
                    record.last_delta = now
                elif kind in TERMINAL_EVENTS:
                    record.terminal = kind
                    response = getattr(event, "response", None)
                    record.status = getattr(response, "status", None)
                    if kind == "error":
                        record.error = f"error event: {getattr(event, 'message', '')}"[:120]
                    elif kind == "response.failed":
                        error = getattr(response, "error", None)
                        record.error = f"response.failed ({record.status}): {getattr(error, 'message', '')}"[:120]
        finally:
            await stream.close()
    except Exception as error:
        record.error = error_label(error)
    finally:
        record.ended = time.perf_counter()


@dataclass
class ConcurrencyResult:
    target: str
    streams: int
    completed: int  # streams that ended with response.completed
    ttft_ms: list[float]
    gaps_ms: list[float]
    durations_s: list[float]
    events: int
    wall_s: float
    cpu: dict[str, float]
    errors: Counter[str]
    wrong_length: int  # completed streams whose delta count was not knobs.tokens (knobs not honoured)
    upstream_requests: int | None = None  # requests the simulator received meanwhile (restarts show up here)


async def concurrency(
    target: Target, observed: Observed, *, streams: int, knobs: Knobs, limit_s: float
) -> ConcurrencyResult:
    client = make_client(target, limit_s)
    records = [StreamRecord() for _ in range(streams)]
    window = CpuWindow(_cpu_pids(target, observed))
    requests_before = await simulator_requests(observed.simulator_url)
    window.start()
    tasks = [
        asyncio.create_task(_one_stream(client, target, knobs, record, f"bench concurrency {index}"))
        for index, record in enumerate(records)
    ]
    try:
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        window.stop()
        await client.close()
    errors: Counter[str] = Counter()
    for record in records:
        if record.error is not None:
            errors[record.error] += 1
        elif record.terminal is None:
            errors["stream ended without a terminal event" if record.ended else "workload deadline"] += 1
    completed = [r for r in records if r.terminal == "response.completed" and r.error is None]
    return ConcurrencyResult(
        target=target.name,
        streams=streams,
        completed=len(completed),
        ttft_ms=[(r.first_delta - r.started) * 1000 for r in records if r.first_delta is not None],
        gaps_ms=[gap * 1000 for r in records for gap in r.gaps],
        durations_s=[r.ended - r.started for r in completed if r.ended is not None],
        events=sum(r.events for r in records),
        wall_s=window.wall,
        cpu=window.used,
        errors=errors,
        wrong_length=sum(1 for r in completed if r.deltas != knobs.tokens),
        upstream_requests=await simulator_requests(observed.simulator_url) - requests_before,
    )


# --- (b) ceiling -------------------------------------------------------------------------------------------------


@dataclass
class CeilingResult:
    target: str
    streams: int
    seconds: float
    events: int
    deltas: int
    responses_started: int
    cpu: dict[str, float]
    errors: Counter[str]
    upstream_requests: int | None = None  # requests the simulator received for it (restarts show up here)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def cpu_ms_per_1k(self, process: str) -> float | None:
        used = self.cpu.get(process)
        if used is None or not self.events:
            return None
        return used * 1000 / (self.events / 1000)


async def ceiling(target: Target, observed: Observed, *, streams: int, seconds: float, knobs: Knobs) -> CeilingResult:
    """K workers, each opening one stream after another until the window closes; only events received inside
    the window count, and CPU is sampled at its edges."""
    client = make_client(target, seconds + 60)
    window = CpuWindow(_cpu_pids(target, observed))
    records: list[StreamRecord] = []
    errors: Counter[str] = Counter()
    requests_before = await simulator_requests(observed.simulator_url)
    window.start()
    stop_at = time.perf_counter() + seconds

    async def worker(worker_index: int) -> None:
        sequence = 0
        while time.perf_counter() < stop_at:
            record = StreamRecord()
            records.append(record)
            sequence += 1
            await _one_stream(client, target, knobs, record, f"bench ceiling {worker_index}.{sequence}", stop_at)
            if record.error is not None:
                errors[record.error] += 1
                await asyncio.sleep(0.05)  # do not spin on a refusing server

    workers = [asyncio.create_task(worker(index)) for index in range(streams)]
    await asyncio.sleep(max(stop_at - time.perf_counter(), 0))
    window.stop()
    try:
        # Workers notice the closed window at their next event; one whose stream is silent is cut off.
        _, pending = await asyncio.wait(workers, timeout=15)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await client.close()
    return CeilingResult(
        target=target.name,
        streams=streams,
        seconds=window.wall,
        events=sum(r.events for r in records),
        deltas=sum(r.deltas for r in records),
        responses_started=len(records),
        cpu=window.used,
        errors=errors,
        upstream_requests=await simulator_requests(observed.simulator_url) - requests_before,
    )


# --- (c) replay --------------------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    events_target: int
    frames: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    create_seconds: float | None = None
    stored_events: int | None = None
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_frames(self) -> int | None:
        return int(statistics.median(self.frames)) if self.frames else None


async def _count_frames(http: aiohttp.ClientSession, url: str) -> int:
    """Read an SSE body to its end and count its frames (each ends with a blank line)."""
    frames = 0
    carry = b""
    async with http.get(url) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:120]}")
        async for chunk in response.content.iter_any():
            data = carry + chunk
            frames += data.count(b"\n\n")
            carry = data[-1:]
    return frames


async def replay(gateway: Target, *, events: int, repetitions: int, limit_s: float) -> ReplayResult:
    result = ReplayResult(events_target=events)
    client = make_client(gateway, limit_s)
    deadline = time.perf_counter() + limit_s
    try:
        knobs = Knobs(tokens=max(events - FRAMING_EVENTS, 1), token_delay_ms=0, ttft_ms=0)
        started = time.perf_counter()
        created = await client.responses.create(
            model=MODEL, input="bench replay", background=True, metadata=knobs.metadata()
        )
        status = created.status
        while status not in ("completed", "failed", "cancelled", "incomplete"):
            if time.perf_counter() > deadline:
                result.errors[f"response still {status} at the deadline"] += 1
                return result
            await asyncio.sleep(0.1)
            status = (await client.responses.retrieve(created.id)).status
        result.create_seconds = time.perf_counter() - started
        if status != "completed":
            result.errors[f"replay source ended {status}"] += 1
            return result
        url = f"{gateway.base_url}/responses/{created.id}?stream=true"
        http_timeout = aiohttp.ClientTimeout(total=max(deadline - time.perf_counter(), 1))
        async with aiohttp.ClientSession(timeout=http_timeout) as http:
            for _ in range(repetitions):
                started = time.perf_counter()
                try:
                    frames = await _count_frames(http, url)
                except Exception as error:
                    result.errors[error_label(error)] += 1
                    continue
                result.seconds.append(time.perf_counter() - started)
                result.frames.append(frames)
        result.stored_events = result.median_frames
    except Exception as error:
        result.errors[error_label(error)] += 1
    finally:
        await client.close()
    return result


# --- (d) memory --------------------------------------------------------------------------------------------------


@dataclass
class MemoryResult:
    runs: int
    created: int = 0
    in_flight: int | None = None  # simulator-side active requests when RSS was taken
    sampled_in_progress: str | None = None  # e.g. "20/20"
    rss_idle_kib: int | None = None
    rss_loaded_kib: int | None = None
    create_seconds: float | None = None
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def kib_per_run(self) -> float | None:
        if self.rss_idle_kib is None or self.rss_loaded_kib is None or not self.runs:
            return None
        return (self.rss_loaded_kib - self.rss_idle_kib) / self.runs


async def simulator_active(http: aiohttp.ClientSession, simulator_url: str) -> int:
    async with http.get(f"{simulator_url}/sim/stats") as response:
        stats = await response.json()
    return int(stats["active"])


async def simulator_requests(simulator_url: str) -> int:
    """Generation requests the simulator has received so far (a restarted run asks it a second time)."""
    async with aiohttp.ClientSession() as http, http.get(f"{simulator_url}/sim/stats") as response:
        stats = await response.json()
    return int(stats["requests"])


async def wait_simulator_idle(simulator_url: str, limit_s: float) -> int:
    """Wait until the simulator has no request in flight (runs left over by a workload); returns what is left."""
    deadline = time.perf_counter() + limit_s
    async with aiohttp.ClientSession() as http:
        active = await simulator_active(http, simulator_url)
        while active and time.perf_counter() < deadline:
            await asyncio.sleep(0.2)
            active = await simulator_active(http, simulator_url)
    return active


async def _stable_rss(pid: int, limit_s: float = 10.0) -> int:
    """RSS once two readings half a second apart agree within 0.5%."""
    deadline = time.perf_counter() + limit_s
    previous = procs.rss_kib(pid)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        current = procs.rss_kib(pid)
        if abs(current - previous) <= previous * 0.005:
            return current
        previous = current
    return previous


async def memory(
    gateway: Target,
    simulator_url: str,
    *,
    runs: int,
    in_flight: int,
    limit_s: float,
    warm_up: Callable[[], Awaitable[object]],
) -> MemoryResult:
    """`gateway` is a fresh gateway process of its own (see __main__): idle RSS after a warm-up, then `runs`
    background runs that sit `in_progress` (the simulator waits 60 s before their first token)."""
    assert gateway.pid is not None
    result = MemoryResult(runs=runs)
    deadline = time.perf_counter() + limit_s
    client = make_client(gateway, limit_s)
    try:
        await warm_up()
        await asyncio.sleep(1.0)
        result.rss_idle_kib = await _stable_rss(gateway.pid)
        async with aiohttp.ClientSession() as http:
            baseline = await simulator_active(http, simulator_url)
            knobs = Knobs(tokens=10, token_delay_ms=0, ttft_ms=60_000)
            gate = asyncio.Semaphore(in_flight)
            ids: list[str] = []

            async def create(index: int) -> None:
                async with gate:
                    try:
                        response = await client.responses.create(
                            model=MODEL, input=f"bench memory {index}", background=True, metadata=knobs.metadata()
                        )
                        ids.append(response.id)
                    except Exception as error:
                        result.errors[error_label(error)] += 1

            started = time.perf_counter()
            tasks = [asyncio.create_task(create(index)) for index in range(runs)]
            _, pending = await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 1))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                result.errors["create: workload deadline"] += len(pending)
            result.create_seconds = time.perf_counter() - started
            result.created = len(ids)
            # All in progress = the simulator holds one open request per run.
            active = await simulator_active(http, simulator_url) - baseline
            while active < len(ids) and time.perf_counter() < deadline:
                await asyncio.sleep(0.25)
                active = await simulator_active(http, simulator_url) - baseline
            result.in_flight = active
            if active < len(ids):
                result.errors[f"only {active}/{len(ids)} runs reached the simulator by the deadline"] += 1
            result.rss_loaded_kib = await _stable_rss(gateway.pid)
            sample = ids[:: max(len(ids) // 20, 1)][:20]
            statuses = await asyncio.gather(*(client.responses.retrieve(rid) for rid in sample))
            in_progress = sum(1 for response in statuses if response.status == "in_progress")
            result.sampled_in_progress = f"{in_progress}/{len(sample)}"
    except Exception as error:
        result.errors[error_label(error)] += 1
    finally:
        await client.close()
    return result


# --- warm-up -----------------------------------------------------------------------------------------------------


WARM_UP_STREAMS = 8


async def warm_up(target: Target, streams: int = WARM_UP_STREAMS) -> Counter[str]:
    """A few short streams, so lazy imports, SDK model construction and connection pools are paid before
    anything is measured."""
    client = make_client(target, 60)
    knobs = Knobs(tokens=20, token_delay_ms=1, ttft_ms=1)
    records = [StreamRecord() for _ in range(streams)]
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(_one_stream(client, target, knobs, record, f"bench warm-up {i}") for i, record in enumerate(records))
            ),
            timeout=60,
        )
    finally:
        await client.close()
    return Counter(record.error for record in records if record.error is not None)
