"""`python -m bench` (or `make bench`): start Redis, the simulator, a gateway on Redis, a gateway on the embedded
store and LiteLLM as real processes on loopback, run the workloads in interleaved repetitions, account the embedded
store's bytes per event in this process, and write `bench/results/<date>.md` (also printed).

Knobs are environment variables (see bench/README.md); everything started is stopped at the end, even on error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp

from bench import procs, profile, replica_acks, report, store_bytes, workloads
from bench.sse import error_label
from bench.workloads import Knobs, Observed, Target

T = TypeVar("T")
MIN_STEP_SECONDS = 10.0
ALL_WORKLOADS = frozenset({"a", "b", "c", "d", "e", "f"})
# The workloads that need the processes; (e) runs in this process alone.
PROCESS_WORKLOADS = frozenset({"a", "b", "c", "d", "f"})
ALL_TARGETS = ("direct", "bare", "redis", "embedded", "cluster", "litellm")
BENCH_DIR = Path(__file__).resolve().parent
MEASURED_CODE = ("gateway", "runs", "storage", "simulator", "pyproject.toml")
PROFILE_BEFORE = BENCH_DIR / "results" / "profile-before-issue13.md"
# Rough seconds per (d) memory measurement, per (c) replay and for (e), for the time budget's reserves.
MEMORY_ESTIMATE_S = 40.0
REPLAY_ESTIMATE_S = 30.0
STORE_BYTES_ESTIMATE_S = 25.0
REPLICA_ACKS_ESTIMATE_S = 40.0
REPLICA_ACKS_REQUESTS = 300


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_list(name: str, default: str) -> list[str]:
    return [part for part in os.environ.get(name, default).replace(" ", "").split(",") if part]


@dataclass(frozen=True)
class Config:
    reps: int
    light_reps: int
    targets: tuple[str, ...]
    concurrency: int
    light_concurrency: int
    tokens: int
    token_delay_ms: float
    ttft_ms: float
    ceiling_seconds: float
    ceiling_streams: int
    ceiling_tokens: int
    profile_seconds: float
    profile_target: str
    replay_events: int
    replay_reps: int
    memory_runs: int
    memory_in_flight: int
    store_events: int
    store_tokens: int
    budget_seconds: float
    workloads: frozenset[str]
    results_dir: Path
    results_name: str | None
    profile_before: Path

    @classmethod
    def from_env(cls) -> Config:
        targets = _env_list("BENCH_TARGETS", ",".join(ALL_TARGETS))
        unknown = sorted(set(targets) - set(ALL_TARGETS))
        if unknown or "direct" not in targets:
            raise SystemExit(f"bench: BENCH_TARGETS must include direct and name only {', '.join(ALL_TARGETS)}")
        return cls(
            reps=max(_env_int("BENCH_REPS", 3), 1),
            # (a') is short and its p99 of 20 streams is their slowest: more repetitions steady its median.
            light_reps=max(_env_int("BENCH_LIGHT_REPS", 5), 1),
            targets=tuple(name for name in ALL_TARGETS if name in targets),
            concurrency=_env_int("BENCH_CONCURRENCY", 200),
            light_concurrency=_env_int("BENCH_LIGHT_CONCURRENCY", 20),
            tokens=_env_int("BENCH_TOKENS", 300),
            token_delay_ms=_env_float("BENCH_TOKEN_DELAY_MS", 20),
            ttft_ms=_env_float("BENCH_TTFT_MS", 50),
            ceiling_seconds=_env_float("BENCH_SECONDS", 10),
            ceiling_streams=_env_int("BENCH_CEILING_STREAMS", 16),
            ceiling_tokens=_env_int("BENCH_CEILING_TOKENS", 2000),
            profile_seconds=_env_float("BENCH_PROFILE_SECONDS", _env_float("BENCH_SECONDS", 10)),
            profile_target=os.environ.get("BENCH_PROFILE_TARGET", "redis"),
            replay_events=_env_int("BENCH_REPLAY_EVENTS", 10_000),
            replay_reps=_env_int("BENCH_REPLAY_REPS", 3),
            memory_runs=_env_int("BENCH_MEMORY_RUNS", 1000),
            memory_in_flight=_env_int("BENCH_MEMORY_IN_FLIGHT", 100),
            store_events=_env_int("BENCH_STORE_EVENTS", 100_000),
            store_tokens=_env_int("BENCH_STORE_TOKENS", 2000),
            budget_seconds=_env_float("BENCH_BUDGET_SECONDS", 900),
            workloads=frozenset(_env_list("BENCH_WORKLOADS", "a,b,c,d,e,f")),
            results_dir=Path(os.environ.get("BENCH_RESULTS_DIR", BENCH_DIR / "results")),
            results_name=os.environ.get("BENCH_RESULTS_NAME") or None,
            profile_before=Path(os.environ.get("BENCH_PROFILE_BEFORE", PROFILE_BEFORE)),
        )

    def params(self) -> dict[str, str]:
        return {
            "reps": str(self.reps),
            "light_reps": str(self.light_reps),
            "targets": ",".join(self.targets),
            "concurrency": str(self.concurrency),
            "light_concurrency": str(self.light_concurrency),
            "tokens": str(self.tokens),
            "token_delay_ms": f"{self.token_delay_ms:g}",
            "ttft_ms": f"{self.ttft_ms:g}",
            "ceiling_streams": str(self.ceiling_streams),
            "ceiling_tokens": str(self.ceiling_tokens),
            "ceiling_seconds": f"{self.ceiling_seconds:g}",
            "profile_seconds": f"{self.profile_seconds:g}",
            "profile_target": self.profile_target,
            "replay_events": str(self.replay_events),
            "replay_reps": str(self.replay_reps),
            "memory_runs": str(self.memory_runs),
            "memory_in_flight": str(self.memory_in_flight),
            "store_events": str(self.store_events),
            "store_tokens": str(self.store_tokens),
            "workloads": ",".join(sorted(self.workloads)),
            "event_loop": os.environ.get("BENCH_EVENT_LOOP", "default (uvloop)"),
        }


class Budget:
    """The whole run's time allowance; each workload's own deadline is cut to what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def cap(self, wanted: float, reserve: float = 0.0) -> float:
        """`wanted`, or less if the budget (minus `reserve` for what comes after) runs out first."""
        return max(min(wanted, self.seconds - self.elapsed() - reserve), 0.0)


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


def _command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=procs.ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header() -> dict[str, str]:
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _command_output(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (+ uncommitted changes)"
    # The commit that last changed what is measured (a bench-only commit on top does not change the numbers).
    code = _command_output(["git", "log", "-1", "--format=%h", "--", *MEASURED_CODE])
    if code and not commit.startswith(code):
        commit += f"; gateway code last changed in {code}"
    redis_version = _command_output(["redis-server", "--version"]).split(" ")
    version = next((part[2:] for part in redis_version if part.startswith("v=")), "unknown")
    py_spy = procs.py_spy_binary()
    py_spy_version = _command_output([str(py_spy), "--version"]) if py_spy else "py-spy not installed"
    return {
        "machine": f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_cpu_model()}, "
        f"Linux {platform.release()}",
        "software": f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, redis-server {version}, "
        f"litellm {procs.litellm_version() or 'not installed'}, {py_spy_version}",
        "gateway commit": commit,
    }


async def _phase(
    results: report.BenchResults,
    budget: Budget,
    name: str,
    step: Callable[[], Awaitable[T]],
    reserve: float = 0.0,
) -> T | None:
    """Run one step; a failure is noted in the report and the benchmark goes on. A step is skipped when less than
    MIN_STEP_SECONDS of the budget (minus `reserve` for what comes after) is left."""
    if budget.cap(MIN_STEP_SECONDS, reserve) < MIN_STEP_SECONDS:
        message = f"{name} skipped: the time budget (BENCH_BUDGET_SECONDS={budget.seconds:g}) is used up"
        results.notes.append(message)
        log(budget, message)
        return None
    log(budget, f"{name} ...")
    started = time.monotonic()
    try:
        value = await step()
    except Exception as error:
        message = f"{name} failed: {error_label(error)}"
        results.notes.append(message)
        log(budget, message)
        return None
    log(budget, f"{name} done in {time.monotonic() - started:.1f}s")
    return value


def _cpu_line(result: workloads.Measured) -> str:
    parts = [f"{name} {used:.1f}" for name, used in result.cpu.items()]
    parts.append(f"busy {result.load.busy_percent:.0f}% of all cores, load {result.load.loadavg_1m:.2f}")
    return "  CPU s: " + ", ".join(parts)


class Bench:
    """One run: the processes, the targets, and the workloads in order."""

    def __init__(self, config: Config, group: procs.ProcessGroup, budget: Budget, results: report.BenchResults):
        self.config, self.group, self.budget, self.results = config, group, budget, results
        self.targets: list[Target] = []
        self.redis: procs.Proc | None = None
        self.simulator: procs.Proc | None = None
        self.gateways: dict[str, procs.Proc] = {}
        self.cluster_url: str | None = None
        self.observed: Observed | None = None

    # -- processes ------------------------------------------------------------------------------------------------

    def _storage_url(self, name: str) -> str:
        assert self.redis is not None
        if name == "cluster":
            if self.cluster_url is None:
                self.cluster_url = procs.start_redis_cluster(self.group)
            return self.cluster_url
        return f"redis://{procs.LOOPBACK}:{self.redis.port}/0" if name == "redis" else "memory://"

    def start(self) -> None:
        config, group, results = self.config, self.group, self.results
        self.redis = redis = procs.start_redis(group)
        self.simulator = simulator = procs.start_simulator(
            group, tokens=config.tokens, token_delay_ms=config.token_delay_ms, ttft_ms=config.ttft_ms
        )
        self.observed = Observed(
            simulator_pid=simulator.pid,
            redis_pid=redis.pid,
            simulator_url=simulator.url,
            redis=procs.RedisProbe(redis.port),
        )
        self.targets = [Target("direct", f"{simulator.url}/v1", pid=None, background=False)]
        if "bare" in config.targets:
            bare = procs.start_bare_proxy(group, simulator_url=simulator.url)
            self.targets.append(Target("bare", f"{bare.url}/v1", pid=bare.pid, background=False))
        for name in ("redis", "embedded", "cluster"):
            if name not in config.targets:
                continue
            gateway = procs.start_gateway(
                group, name=f"gateway-{name}", storage_url=self._storage_url(name), simulator_url=simulator.url
            )
            self.gateways[name] = gateway
            self.targets.append(Target(name, f"{gateway.url}/v1", pid=gateway.pid, background=True, stored=True))
        if "litellm" not in config.targets:
            return
        if procs.litellm_binary() is None:
            results.unavailable["litellm"] = report.NOT_INSTALLED
            results.notes.append("LiteLLM is not installed: `make bench-setup` puts it in bench/.venv-litellm.")
            return
        master_key = "sk-bench-" + secrets.token_hex(12)  # a fresh key per run, handed over in the environment
        try:
            litellm = procs.start_litellm(
                group, simulator_url=simulator.url, redis_port=redis.port, master_key=master_key
            )
        except Exception as error:
            results.unavailable["litellm"] = "failed to start"
            results.notes.append(f"litellm did not start: {error_label(error)}")
            return
        self.targets.append(
            Target(
                "litellm", f"{litellm.url}/v1", pid=litellm.pid, background=False, api_key=master_key, knob_headers=True
            )
        )

    async def warm_up(self) -> None:
        for target in list(self.targets):
            errors = await workloads.warm_up(target)
            if not errors:
                continue
            message = ", ".join(f"{count}x {text}" for text, count in errors.items())
            self.results.notes.append(f"warm-up of {target.name}: {message}")
            if sum(errors.values()) >= workloads.WARM_UP_STREAMS and target.name == "litellm":
                self.results.unavailable[target.name] = "no /v1/responses" if "404" in message else "failed"
                self.targets.remove(target)

    async def settle(self) -> None:
        assert self.simulator is not None
        left = await workloads.wait_simulator_idle(self.simulator.url, limit_s=self.budget.cap(20, reserve=30))
        if left:
            self.results.notes.append(f"{left} simulator requests were still active when the next workload started")

    # -- time budget ----------------------------------------------------------------------------------------------

    def _reserve_after(self, workload: str) -> float:
        """Seconds to keep for the workloads after `workload`, so a slow early one cannot starve them all."""
        config = self.config
        reserve = 0.0
        if workload < "b" and "b" in config.workloads:
            reserve += config.reps * len(self.targets) * (config.ceiling_seconds + 4) + config.profile_seconds + 5
        if workload < "c" and "c" in config.workloads:
            reserve += REPLAY_ESTIMATE_S
        if workload < "d" and "d" in config.workloads:
            reserve += MEMORY_ESTIMATE_S * len(self.gateways)
        if workload < "e" and "e" in config.workloads:
            reserve += STORE_BYTES_ESTIMATE_S
        if workload < "f" and "f" in config.workloads and "cluster" in config.targets:
            reserve += REPLICA_ACKS_ESTIMATE_S
        return reserve

    # -- workloads ------------------------------------------------------------------------------------------------

    async def concurrency(self) -> None:
        config, budget, observed = self.config, self.budget, self.observed
        assert observed is not None
        knobs = Knobs(config.tokens, config.token_delay_ms, config.ttft_ms)
        nominal = (config.ttft_ms + config.tokens * config.token_delay_ms) / 1000
        reserve = self._reserve_after("a")
        # The light level first: a clean, unsaturated measurement before the heavy one loads everything.
        levels = [("(a)", config.concurrency, config.reps, self.results.concurrency)]
        if config.light_concurrency > 0:
            levels.insert(0, ("(a')", config.light_concurrency, config.light_reps, self.results.light))
        for block, streams, reps, into in levels:
            for rep in range(1, reps + 1):
                for target in self.targets:

                    async def step(target: Target = target, streams: int = streams) -> workloads.ConcurrencyResult:
                        return await workloads.concurrency(
                            target,
                            observed,
                            streams=streams,
                            knobs=knobs,
                            limit_s=budget.cap(max(90.0, 10 * nominal), reserve=reserve),
                        )

                    name = f"{block} {streams} streams, {target.name}, rep {rep}/{reps}"
                    result = await _phase(self.results, budget, name, step, reserve=reserve)
                    if result is not None:
                        result.rep = rep
                        into.setdefault(target.name, []).append(result)
                        log(budget, _cpu_line(result))
                    await self.settle()

    async def ceiling(self) -> None:
        config, budget, observed = self.config, self.budget, self.observed
        assert observed is not None
        knobs = Knobs(config.ceiling_tokens, 0, 0)
        reserve = self._reserve_after("b")
        for rep in range(1, config.reps + 1):
            for target in self.targets:
                seconds = budget.cap(config.ceiling_seconds, reserve=reserve + config.profile_seconds)

                async def step(target: Target = target, seconds: float = seconds) -> workloads.CeilingResult:
                    return await workloads.ceiling(
                        target, observed, streams=config.ceiling_streams, seconds=seconds, knobs=knobs
                    )

                name = f"(b) ceiling {target.name} for {seconds:.0f}s, rep {rep}/{config.reps}"
                result = await _phase(self.results, budget, name, step, reserve=reserve + config.profile_seconds)
                if result is not None:
                    result.rep = rep
                    self.results.ceiling.setdefault(target.name, []).append(result)
                    log(budget, _cpu_line(result))
                await self.settle()
        if config.profile_seconds > 0:
            await self.profile(knobs, reserve)

    async def profile(self, knobs: Knobs, reserve: float) -> None:
        """One more ceiling window, not counted in the medians, with py-spy sampling the profiled gateway."""
        config, budget, observed = self.config, self.budget, self.observed
        assert observed is not None
        target = next((t for t in self.targets if t.name == config.profile_target and t.pid is not None), None)
        if target is None or target.pid is None:
            self.results.notes.append(f"no profile: BENCH_PROFILE_TARGET={config.profile_target} is not running")
            return
        pid = target.pid
        output = self.group.workdir / "profile.raw.txt"

        async def step() -> tuple[profile.Profile, workloads.CeilingResult]:
            recorder = profile.start_recording(pid, config.profile_seconds, output)
            await asyncio.sleep(0.5)  # let py-spy attach before the window opens
            result = await workloads.ceiling(
                target, observed, streams=config.ceiling_streams, seconds=config.profile_seconds, knobs=knobs
            )
            found = await asyncio.to_thread(profile.finish_recording, recorder, output)
            return found, result

        name = f"(b) profiled ceiling window, {target.name}, py-spy for {config.profile_seconds:.0f}s"
        recorded = await _phase(self.results, budget, name, step, reserve=reserve)
        if recorded is not None:
            self.results.profile, self.results.profile_window = recorded
            self.results.profile_target = target.name
        await self.settle()

    async def replay(self) -> None:
        config, budget, observed = self.config, self.budget, self.observed
        assert observed is not None
        stored = [target for target in self.targets if target.stored]
        if not stored:
            return
        reserve = self._reserve_after("c")

        async def step() -> dict[str, workloads.ReplayResult]:
            return await workloads.replay(
                stored,
                observed,
                events=config.replay_events,
                repetitions=config.replay_reps,
                limit_s=budget.cap(120, reserve=reserve),
            )

        found = await _phase(self.results, budget, "(c) replay", step, reserve=reserve)
        if found is not None:
            self.results.replay = found
        await self.settle()

    async def memory(self) -> None:
        """Per store: a fresh gateway of its own (own key prefix, so nobody else's sweeper adopts its runs), whose
        idle RSS is not inflated by the heap the other workloads left behind. The measured gateways stop first."""
        config, budget, simulator = self.config, self.budget, self.simulator
        assert simulator is not None
        for gateway in self.gateways.values():
            self.group.stop(gateway)
        names = list(self.gateways)
        for index, name in enumerate(names):
            fresh = procs.start_gateway(
                self.group,
                name=f"gateway-{name}-memory",
                storage_url=self._storage_url(name),
                simulator_url=simulator.url,
                key_prefix="rgwmem",
            )
            target = Target(name, f"{fresh.url}/v1", pid=fresh.pid, background=True, stored=True)
            reserve = MEMORY_ESTIMATE_S * (len(names) - index - 1) + self._reserve_after("d")

            async def step(target: Target = target, reserve: float = reserve) -> workloads.MemoryResult:
                return await workloads.memory(
                    target,
                    simulator.url,
                    runs=config.memory_runs,
                    in_flight=config.memory_in_flight,
                    limit_s=budget.cap(150, reserve=reserve),
                    warm_up=lambda: workloads.warm_up(target),
                )

            result = await _phase(self.results, budget, f"(d) memory, {name}", step, reserve=reserve)
            if result is not None:
                self.results.memory[name] = result
            self.group.stop(fresh)  # its runs go with it; the simulator's held requests see a disconnect
            await self.settle()

    async def store_bytes(self) -> None:
        """(e) in this process: no gateway, no network; deterministic memory accounting, so run once."""
        config = self.config
        if "embedded" not in config.targets:
            self.results.notes.append("(e) skipped: BENCH_TARGETS has no embedded column to show it in")
            return

        async def step() -> store_bytes.StoreBytesResult:
            return await store_bytes.store_bytes(events=config.store_events, tokens=config.store_tokens)

        result = await _phase(self.results, self.budget, "(e) embedded store bytes per event", step)
        if result is not None:
            self.results.store = result
            log(
                self.budget,
                f"  {result.events:,} events: retained {result.retained_per_event or 0:,.0f} B, JSON "
                f"{result.json_per_event or 0:,.0f} B, overhead {result.overhead_per_event or 0:,.0f} B per event",
            )

    async def replica_acks(self) -> None:
        """(f) Two fresh gateways on the cluster, the same but for `storage.replica_acks: 1`, in turn."""
        config, simulator = self.config, self.simulator
        if "cluster" not in config.targets or simulator is None:
            self.results.notes.append("(f) skipped: BENCH_TARGETS has no cluster to wait for replicas on")
            return
        started = []
        for name, extra in (("cluster", {}), ("cluster-acks", {"GATEWAY_STORAGE__REPLICA_ACKS": "1"})):
            proc = procs.start_gateway(
                self.group,
                name=f"gateway-{name}-acks-workload",
                storage_url=self._storage_url("cluster"),
                simulator_url=simulator.url,
                key_prefix="rgwacks",
                extra_env=extra,
            )
            started.append((proc, Target(name, f"{proc.url}/v1", pid=proc.pid, background=False, stored=True)))
        targets = [target for _, target in started]

        async def step() -> replica_acks.AckLatency:
            for target in targets:
                await workloads.warm_up(target)
            return await replica_acks.measure(
                targets,
                requests=REPLICA_ACKS_REQUESTS,
                repetitions=config.reps,
                limit_s=self.budget.cap(REPLICA_ACKS_ESTIMATE_S * 2),
            )

        try:
            self.results.replica_acks = await _phase(self.results, self.budget, "(f) replica acks", step)
        finally:
            for proc, _ in started:
                self.group.stop(proc)

    async def run(self) -> None:
        chosen = self.config.workloads
        if chosen & PROCESS_WORKLOADS:
            self.start()
            processes = ", ".join(f"{p.name} pid {p.pid} :{p.port}" for p in self.group.procs)
            log(self.budget, "processes up: " + processes)
            await self.warm_up()
            log(self.budget, "warm-up done: targets " + ", ".join(t.name for t in self.targets))
        if "a" in chosen:
            await self.concurrency()
        if "b" in chosen:
            await self.ceiling()
        if "c" in chosen:
            await self.replay()
        if "d" in chosen:
            await self.memory()
        if "e" in chosen:
            await self.store_bytes()
        if "f" in chosen:
            await self.replica_acks()

    def close(self) -> None:
        if self.observed is not None and self.observed.redis is not None:
            self.observed.redis.close()


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def _results_path(config: Config, date: str) -> Path:
    # A partial run (BENCH_WORKLOADS=b, ...) gets a name of its own, so it never replaces the day's full report.
    partial = "" if config.workloads >= ALL_WORKLOADS else "-" + "".join(sorted(config.workloads))
    return config.results_dir / f"{config.results_name or date + partial}.md"


def main() -> int:
    config = Config.from_env()
    budget = Budget(config.budget_seconds)
    now = dt.datetime.now().astimezone()
    results = report.BenchResults(
        date=now.date().isoformat(),
        header={"started": now.strftime("%Y-%m-%d %H:%M:%S %Z"), **machine_header()},
        params=config.params(),
        targets=list(config.targets),
    )
    if config.profile_before.exists():
        results.profile_before = config.profile_before.read_text()
    workdir = Path(tempfile.mkdtemp(prefix="responses-gateway-bench-"))
    group = procs.ProcessGroup(workdir)
    bench = Bench(config, group, budget, results)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    failed = False
    try:
        asyncio.run(bench.run())
    except BaseException as error:
        failed = True
        results.notes.append(f"benchmark aborted: {error_label(error)}")
        print(f"bench: aborted: {error!r}", file=sys.stderr)
        for proc in group.procs:
            tail = proc.log_tail(10)
            if tail:
                print(f"--- {proc.name} log tail ---\n{tail}", file=sys.stderr)
    finally:
        bench.close()
        group.stop_all()
        problems = {proc.name: proc.problems() for proc in group.started}
    nominal = (config.ttft_ms + config.tokens * config.token_delay_ms) / 1000
    results.notes.extend(report.derive_notes(results, nominal))
    for name, found in problems.items():
        for count, text in found:
            results.log_problems.append(f"{name}: {count}x `{text}`")
    wall = budget.elapsed()
    results.header["wall time"] = f"{wall:.0f} s ({wall / 60:.1f} min, processes started and stopped included)"
    text = report.render(results)
    config.results_dir.mkdir(parents=True, exist_ok=True)
    path = _results_path(config, results.date)
    path.write_text(text)
    if results.profile is not None:
        profile_path = path.with_name(path.stem + "-profile.md")
        profile_path.write_text(report.render_profile_page(results))
    print(text)
    print(f"bench: wrote {path.relative_to(procs.ROOT) if path.is_relative_to(procs.ROOT) else path}", file=sys.stderr)
    if failed or results.log_problems:
        print(f"bench: process logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
