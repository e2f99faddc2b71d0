"""The four workloads, driven over loopback by the light SSE client of `bench.sse` (raw aiohttp, no SDK).

(a) `concurrency`: N concurrent streams at a model's pace; TTFT and the delays between consecutive text deltas.
(b) `ceiling`: K streams from a simulator at full speed for a fixed time; events/s and CPU per event.
(c) `replay`: one finished 10,000-event response streamed again by `GET /v1/responses/{id}?stream=true`.
(d) `memory`: RSS of a fresh gateway idle, then with 1,000 background runs in flight and nobody listening.

Every workload is bounded in time: what has not finished by its deadline is cancelled and counted as a timeout.
Each measured window also records the machine's load and, when Redis is observed, its command counters.
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
import orjson

from bench import procs
from bench.sse import HttpStatusError, StreamRecord, count_frames, error_label, post_stream

MODEL = "sim-1"
# Events of one simulated response besides its text deltas: created, in_progress, item added, part added,
# text done, part done, item done, completed.
FRAMING_EVENTS = 8
CONNECT_TIMEOUT_S = 30.0
CEILING_GRACE_S = 3.0


@dataclass(frozen=True)
class Target:
    """Where the clients send their requests."""

    name: str  # "direct", "redis", "embedded", "litellm"
    base_url: str  # ends in /v1
    pid: int | None  # the process whose CPU is this target's cost (None: nothing between client and model)
    background: bool  # send background=True (only the gateway has background runs)
    stored: bool = False  # keeps responses (GET /v1/responses/{id}): the gateway
    api_key: str = "bench-unused"
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


def request_headers(target: Target, knobs: Knobs | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"}
    if knobs is not None and target.knob_headers:
        headers.update(knobs.headers())
    return headers


def create_body(target: Target, label: str, knobs: Knobs, *, stream: bool, background: bool | None = None) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "input": label, "metadata": knobs.metadata()}
    if stream:
        body["stream"] = True
    if target.background if background is None else background:
        body["background"] = True
    return orjson.dumps(body)


def http_session(limit_s: float) -> aiohttp.ClientSession:
    """No cap on connections (aiohttp's default of 100 would queue half of 200 streams)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=limit_s, sock_connect=CONNECT_TIMEOUT_S),
    )


async def stream_once(
    http: aiohttp.ClientSession,
    target: Target,
    knobs: Knobs,
    record: StreamRecord,
    label: str,
    *,
    stop_at: float | None = None,
) -> None:
    """One `POST /v1/responses` with `stream: true` read to its end (or to `stop_at`)."""
    body = create_body(target, label, knobs, stream=True)
    await post_stream(
        http, f"{target.base_url}/responses", body, request_headers(target, knobs), record, stop_at=stop_at
    )


@dataclass(frozen=True)
class Observed:
    """The processes whose CPU every workload samples, and the Redis whose counters it reads."""

    simulator_pid: int
    redis_pid: int
    simulator_url: str
    redis: procs.RedisProbe | None = None


@dataclass
class Load:
    """How busy the machine was during one measured window."""

    busy_percent: float  # busy time of all cores over the window (/proc/stat), % of all cores
    loadavg_1m: float  # /proc/loadavg at the end of the window


class Window:
    """CPU seconds used by a set of processes, the machine's load, and Redis's counters between `start()` and
    `stop()`."""

    def __init__(self, pids: dict[str, int | None], redis_probe: procs.RedisProbe | None = None) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._redis = redis_probe
        self._start: dict[str, float] = {}
        self._redis_start: tuple[int, int] | None = None
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self.load = Load(0.0, 0.0)
        self.redis_commands: int | None = None
        self.redis_input_bytes: int | None = None
        self._t0 = 0.0
        self._busy0 = 0.0

    def _sample(self) -> dict[str, float]:
        # Only a proxy's own workers count as its children; the bench client's children are the processes under
        # test, and the simulator and Redis have none.
        return {name: procs.cpu_seconds(pid, with_children=name == "target") for name, pid in self._pids.items()}

    def measured(self, target: str, *, events: int, errors: Counter[str], upstream_requests: int) -> dict[str, Any]:
        """The fields of a Measured that come from this (stopped) window, with the workload's own counts."""
        return {
            "target": target,
            "events": events,
            "wall_s": self.wall,
            "cpu": self.used,
            "load": self.load,
            "errors": errors,
            "redis_commands": self.redis_commands,
            "redis_input_bytes": self.redis_input_bytes,
            "upstream_requests": upstream_requests,
        }

    def start(self) -> None:
        if self._redis is not None:
            self._redis_start = self._redis.read()
        self._start = self._sample()
        self._busy0 = procs.machine_busy_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        end = self._sample()
        busy = procs.machine_busy_seconds() - self._busy0
        self.used = {name: end[name] - self._start[name] for name in end}
        # Whatever else ran on the machine meanwhile (another benchmark, a test suite) disturbs the numbers.
        self.used["others"] = max(busy - sum(self.used.values()), 0.0)
        cores = os.cpu_count() or 1
        # /proc/stat counts in clock ticks (10 ms): a window of a few ticks can read above 100%.
        busy_percent = min(100 * busy / (self.wall * cores), 100.0) if self.wall else 0.0
        self.load = Load(busy_percent, procs.loadavg_1m())
        if self._redis is not None and self._redis_start is not None:
            self.redis_commands, self.redis_input_bytes = procs.RedisProbe.commands_between(
                self._redis_start, self._redis.read()
            )


def _cpu_pids(target: Target, observed: Observed) -> dict[str, int | None]:
    """The processes to sample: "target" is the proxy (None for direct), "client" this process."""
    return {
        "target": target.pid,
        "simulator": observed.simulator_pid,
        "redis": observed.redis_pid,
        "client": os.getpid(),
    }


@dataclass
class Measured:
    """What every measured window of (a) and (b) records besides its own numbers."""

    target: str
    events: int
    wall_s: float
    cpu: dict[str, float]
    load: Load
    errors: Counter[str]
    redis_commands: int | None
    redis_input_bytes: int | None
    upstream_requests: int | None  # requests the simulator received meanwhile (restarts show up here)
    rep: int = 0  # which repetition (1-based), set by the caller

    def cpu_ms_per_1k(self, process: str) -> float | None:
        used = self.cpu.get(process)
        if used is None or not self.events:
            return None
        return used * 1000 / (self.events / 1000)

    def redis_per_event(self) -> float | None:
        return self.redis_commands / self.events if self.redis_commands is not None and self.events else None

    def redis_bytes_per_event(self) -> float | None:
        return self.redis_input_bytes / self.events if self.redis_input_bytes is not None and self.events else None


# --- (a) concurrency ---------------------------------------------------------------------------------------------


@dataclass
class ConcurrencyResult(Measured):
    streams: int = 0
    completed: int = 0  # streams that ended with response.completed
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    durations_s: list[float] = field(default_factory=list)
    wrong_length: int = 0  # completed streams whose delta count was not knobs.tokens (knobs not honoured)


async def concurrency(
    target: Target, observed: Observed, *, streams: int, knobs: Knobs, limit_s: float
) -> ConcurrencyResult:
    records = [StreamRecord() for _ in range(streams)]
    window = Window(_cpu_pids(target, observed), observed.redis)
    requests_before = await simulator_requests(observed.simulator_url)
    async with http_session(limit_s) as http:
        window.start()
        tasks = [
            asyncio.create_task(stream_once(http, target, knobs, record, f"bench concurrency {index}"))
            for index, record in enumerate(records)
        ]
        try:
            _, pending = await asyncio.wait(tasks, timeout=limit_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            window.stop()
    errors: Counter[str] = Counter()
    for record in records:
        if record.error is not None:
            errors[record.error] += 1
        elif record.terminal is None:
            errors["stream ended without a terminal event"] += 1
    completed = [r for r in records if r.terminal == "response.completed" and r.error is None]
    return ConcurrencyResult(
        **window.measured(
            target.name,
            events=sum(r.events for r in records),
            errors=errors,
            upstream_requests=await simulator_requests(observed.simulator_url) - requests_before,
        ),
        streams=streams,
        completed=len(completed),
        ttft_ms=[(r.first_delta - r.started) * 1000 for r in records if r.first_delta is not None],
        gaps_ms=[gap * 1000 for r in records for gap in r.gaps],
        durations_s=[r.ended - r.started for r in completed if r.ended is not None],
        wrong_length=sum(1 for r in completed if r.deltas != knobs.tokens),
    )


# --- (b) ceiling -------------------------------------------------------------------------------------------------


@dataclass
class CeilingResult(Measured):
    streams: int = 0
    deltas: int = 0
    responses_started: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s else 0.0


async def ceiling(target: Target, observed: Observed, *, streams: int, seconds: float, knobs: Knobs) -> CeilingResult:
    """K workers, each opening one stream after another until the window closes; only events received inside
    the window count, and CPU is sampled at its edges."""
    window = Window(_cpu_pids(target, observed), observed.redis)
    records: list[StreamRecord] = []
    errors: Counter[str] = Counter()
    requests_before = await simulator_requests(observed.simulator_url)
    async with http_session(seconds + 60) as http:
        window.start()
        stop_at = time.perf_counter() + seconds

        async def worker(worker_index: int) -> None:
            sequence = 0
            while time.perf_counter() < stop_at:
                record = StreamRecord()
                records.append(record)
                sequence += 1
                label = f"bench ceiling {worker_index}.{sequence}"
                await stream_once(http, target, knobs, record, label, stop_at=stop_at)
                if record.error is not None:
                    errors[record.error] += 1
                    await asyncio.sleep(0.05)  # do not spin on a refusing server

        workers = [asyncio.create_task(worker(index)) for index in range(streams)]
        await asyncio.sleep(max(stop_at - time.perf_counter(), 0))
        window.stop()
        # Workers stop at their next chunk. One still waiting for its answer's headers (a queueing proxy) gets a
        # short grace, then is cut off: what arrived in the window is recorded already. (Cutting a request the
        # simulator has not answered yet makes it log an error writing its headers.)
        _, pending = await asyncio.wait(workers, timeout=CEILING_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return CeilingResult(
        **window.measured(
            target.name,
            events=sum(r.events for r in records),
            errors=errors,
            upstream_requests=await simulator_requests(observed.simulator_url) - requests_before,
        ),
        streams=streams,
        deltas=sum(r.deltas for r in records),
        responses_started=len(records),
    )


# --- (c) replay --------------------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    target: str
    events_target: int
    frames: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    create_seconds: float | None = None
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_frames(self) -> int | None:
        return int(statistics.median(self.frames)) if self.frames else None


async def create_response(http: aiohttp.ClientSession, target: Target, label: str, knobs: Knobs) -> dict[str, Any]:
    """A non-streaming `background: true` create; returns the response object."""
    body = create_body(target, label, knobs, stream=False, background=True)
    async with http.post(f"{target.base_url}/responses", data=body, headers=request_headers(target)) as response:
        if response.status != 200:
            raise HttpStatusError(response.status, await response.text())
        created: dict[str, Any] = orjson.loads(await response.read())
        return created


async def retrieve_status(http: aiohttp.ClientSession, target: Target, response_id: str) -> str:
    async with http.get(f"{target.base_url}/responses/{response_id}", headers=request_headers(target)) as response:
        if response.status != 200:
            raise HttpStatusError(response.status, await response.text())
        return str(orjson.loads(await response.read())["status"])


async def _generate_for_replay(
    http: aiohttp.ClientSession, target: Target, events: int, deadline: float, result: ReplayResult
) -> str | None:
    """One background run of `events` events at full speed, awaited until it ends; its id if it completed."""
    knobs = Knobs(tokens=max(events - FRAMING_EVENTS, 1), token_delay_ms=0, ttft_ms=0)
    started = time.perf_counter()
    created = await create_response(http, target, "bench replay", knobs)
    status = str(created["status"])
    while status not in ("completed", "failed", "cancelled", "incomplete"):
        if time.perf_counter() > deadline:
            result.errors[f"response still {status} at the deadline"] += 1
            return None
        await asyncio.sleep(0.1)
        status = await retrieve_status(http, target, created["id"])
    result.create_seconds = time.perf_counter() - started
    if status != "completed":
        result.errors[f"replay source ended {status}"] += 1
        return None
    return str(created["id"])


async def replay(
    targets: list[Target], observed: Observed, *, events: int, repetitions: int, limit_s: float
) -> dict[str, ReplayResult]:
    """One finished response per stored target, then its full replay `repetitions` times, the targets
    interleaved (a, b, a, b, ...), each read timed to its last byte."""
    results = {target.name: ReplayResult(target=target.name, events_target=events) for target in targets}
    deadline = time.perf_counter() + limit_s
    async with http_session(limit_s) as http:
        sources: dict[str, str] = {}
        for target in targets:
            try:
                response_id = await _generate_for_replay(http, target, events, deadline, results[target.name])
            except Exception as error:
                results[target.name].errors[error_label(error)] += 1
                continue
            if response_id is not None:
                sources[target.name] = response_id
        for _ in range(repetitions):
            for target in targets:
                if target.name not in sources:
                    continue
                result = results[target.name]
                window = Window(_cpu_pids(target, observed))
                window.start()
                started = time.perf_counter()
                try:
                    frames = await count_frames(http, f"{target.base_url}/responses/{sources[target.name]}?stream=true")
                except Exception as error:
                    result.errors[error_label(error)] += 1
                    continue
                result.seconds.append(time.perf_counter() - started)
                window.stop()
                result.frames.append(frames)
                result.loads.append(window.load)
    return results


# --- (d) memory --------------------------------------------------------------------------------------------------


@dataclass
class MemoryResult:
    target: str
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
    result = MemoryResult(target=gateway.name, runs=runs)
    deadline = time.perf_counter() + limit_s
    try:
        await warm_up()
        await asyncio.sleep(1.0)
        result.rss_idle_kib = await _stable_rss(gateway.pid)
        async with http_session(limit_s) as http:
            baseline = await simulator_active(http, simulator_url)
            knobs = Knobs(tokens=10, token_delay_ms=0, ttft_ms=60_000)
            gate = asyncio.Semaphore(in_flight)
            ids: list[str] = []

            async def create(index: int) -> None:
                async with gate:
                    try:
                        created = await create_response(http, gateway, f"bench memory {index}", knobs)
                        ids.append(str(created["id"]))
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
            statuses = await asyncio.gather(*(retrieve_status(http, gateway, rid) for rid in sample))
            in_progress = sum(1 for status in statuses if status == "in_progress")
            result.sampled_in_progress = f"{in_progress}/{len(sample)}"
    except Exception as error:
        result.errors[error_label(error)] += 1
    return result


# --- warm-up -----------------------------------------------------------------------------------------------------


WARM_UP_STREAMS = 8


async def warm_up(target: Target, streams: int = WARM_UP_STREAMS) -> Counter[str]:
    """A few short streams, so lazy imports and connection set-up are paid before anything is measured."""
    knobs = Knobs(tokens=20, token_delay_ms=1, ttft_ms=1)
    records = [StreamRecord() for _ in range(streams)]
    async with http_session(60) as http:
        await asyncio.wait_for(
            asyncio.gather(
                *(stream_once(http, target, knobs, record, f"bench warm-up {i}") for i, record in enumerate(records))
            ),
            timeout=60,
        )
    errors = Counter(record.error for record in records if record.error is not None)
    wrong = sum(1 for record in records if record.error is None and record.deltas != knobs.tokens)
    if wrong:
        errors[f"stream with a delta count other than {knobs.tokens} (knobs not honoured?)"] += wrong
    return errors
