"""`python -m bench` (or `make bench`): start Redis, the simulator, the gateway (and LiteLLM when installed) as
real processes on loopback, run the four workloads, and write `bench/results/<date>.md` (also printed).

Knobs are environment variables (see bench/README.md); everything started is stopped at the end, even on error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
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
import openai

from bench import procs, report, workloads
from bench.workloads import Knobs, Observed, Target

T = TypeVar("T")
MIN_STEP_SECONDS = 10.0
ALL_WORKLOADS = frozenset({"a", "b", "c", "d"})
BENCH_DIR = Path(__file__).resolve().parent


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class Config:
    concurrency: int
    light_concurrency: int
    tokens: int
    token_delay_ms: float
    ttft_ms: float
    ceiling_seconds: float
    ceiling_streams: int
    ceiling_tokens: int
    replay_events: int
    replay_reps: int
    memory_runs: int
    memory_in_flight: int
    budget_seconds: float
    workloads: frozenset[str]
    results_dir: Path

    @classmethod
    def from_env(cls) -> Config:
        return cls(
            concurrency=_env_int("BENCH_CONCURRENCY", 200),
            light_concurrency=_env_int("BENCH_LIGHT_CONCURRENCY", 20),
            tokens=_env_int("BENCH_TOKENS", 300),
            token_delay_ms=_env_float("BENCH_TOKEN_DELAY_MS", 20),
            ttft_ms=_env_float("BENCH_TTFT_MS", 50),
            ceiling_seconds=_env_float("BENCH_SECONDS", 20),
            ceiling_streams=_env_int("BENCH_CEILING_STREAMS", 16),
            ceiling_tokens=_env_int("BENCH_CEILING_TOKENS", 2000),
            replay_events=_env_int("BENCH_REPLAY_EVENTS", 10_000),
            replay_reps=_env_int("BENCH_REPLAY_REPS", 3),
            memory_runs=_env_int("BENCH_MEMORY_RUNS", 1000),
            memory_in_flight=_env_int("BENCH_MEMORY_IN_FLIGHT", 100),
            budget_seconds=_env_float("BENCH_BUDGET_SECONDS", 400),
            workloads=frozenset(os.environ.get("BENCH_WORKLOADS", "a,b,c,d").replace(" ", "").split(",")),
            results_dir=Path(os.environ.get("BENCH_RESULTS_DIR", BENCH_DIR / "results")),
        )

    def params(self) -> dict[str, str]:
        return {
            "concurrency": str(self.concurrency),
            "light_concurrency": str(self.light_concurrency),
            "tokens": str(self.tokens),
            "token_delay_ms": f"{self.token_delay_ms:g}",
            "ttft_ms": f"{self.ttft_ms:g}",
            "ceiling_streams": str(self.ceiling_streams),
            "ceiling_tokens": str(self.ceiling_tokens),
            "ceiling_seconds": f"{self.ceiling_seconds:g}",
            "replay_events": str(self.replay_events),
            "replay_reps": str(self.replay_reps),
            "memory_runs": str(self.memory_runs),
            "memory_in_flight": str(self.memory_in_flight),
            "workloads": ",".join(sorted(self.workloads)),
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
    redis_version = _command_output(["redis-server", "--version"]).split(" ")
    version = next((part[2:] for part in redis_version if part.startswith("v=")), "unknown")
    return {
        "machine": f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_cpu_model()}, "
        f"Linux {platform.release()}",
        "software": f"Python {platform.python_version()}, openai {openai.__version__}, aiohttp {aiohttp.__version__}, "
        f"redis-server {version}",
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
        message = f"{name} failed: {workloads.error_label(error)}"
        results.notes.append(message)
        log(budget, message)
        return None
    log(budget, f"{name} done in {time.monotonic() - started:.1f}s")
    return value


async def run(config: Config, group: procs.ProcessGroup, budget: Budget, results: report.BenchResults) -> None:
    redis = procs.start_redis(group)
    redis_url = f"redis://{procs.LOOPBACK}:{redis.port}/0"
    simulator = procs.start_simulator(
        group, tokens=config.tokens, token_delay_ms=config.token_delay_ms, ttft_ms=config.ttft_ms
    )
    gateway = procs.start_gateway(group, name="gateway", redis_url=redis_url, simulator_url=simulator.url)
    observed = Observed(simulator_pid=simulator.pid, redis_pid=redis.pid, simulator_url=simulator.url)
    targets = [
        Target("direct", f"{simulator.url}/v1", pid=None, background=False),
        Target("gateway", f"{gateway.url}/v1", pid=gateway.pid, background=True),
    ]
    if not procs.litellm_available():
        results.unavailable["litellm"] = report.NOT_INSTALLED
    else:
        try:
            litellm = procs.start_litellm(group, simulator_url=simulator.url, redis_port=redis.port)
            targets.append(Target("litellm", f"{litellm.url}/v1", pid=litellm.pid, background=False, knob_headers=True))
        except Exception as error:
            results.unavailable["litellm"] = "failed to start"
            results.notes.append(f"litellm did not start: {workloads.error_label(error)}")
    log(budget, "processes up: " + ", ".join(f"{p.name} pid {p.pid} :{p.port}" for p in group.procs))

    for target in list(targets):
        errors = await workloads.warm_up(target)
        if errors:
            message = ", ".join(f"{count}x {text}" for text, count in errors.items())
            results.notes.append(f"warm-up of {target.name}: {message}")
            nothing_got_through = sum(errors.values()) == workloads.WARM_UP_STREAMS
            if nothing_got_through and target.name != "gateway":  # e.g. a LiteLLM without /v1/responses
                results.unavailable[target.name] = "no /v1/responses" if "404" in message else "failed"
                targets.remove(target)
    log(budget, "warm-up done")

    async def settle() -> None:
        left = await workloads.wait_simulator_idle(simulator.url, limit_s=budget.cap(20, reserve=60))
        if left:
            results.notes.append(f"{left} simulator requests were still active when the next workload started")

    if "a" in config.workloads:
        knobs = Knobs(config.tokens, config.token_delay_ms, config.ttft_ms)
        nominal = (config.ttft_ms + config.tokens * config.token_delay_ms) / 1000
        # The light level first: a clean, unsaturated measurement before the heavy one loads everything.
        levels = [("(a)", config.concurrency, results.concurrency)]
        if config.light_concurrency > 0:
            levels.insert(0, ("(a')", config.light_concurrency, results.light))
        for block, streams, into in levels:
            for target in targets:

                async def step_a(target: Target = target, streams: int = streams) -> workloads.ConcurrencyResult:
                    return await workloads.concurrency(
                        target,
                        observed,
                        streams=streams,
                        knobs=knobs,
                        limit_s=budget.cap(max(90.0, 10 * nominal), reserve=150),
                    )

                result_a = await _phase(
                    results, budget, f"{block} {streams} streams, {target.name}", step_a, reserve=150
                )
                if result_a is not None:
                    into[target.name] = result_a
                    log(budget, "  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in result_a.cpu.items()))
                await settle()

    if "b" in config.workloads:
        knobs = Knobs(config.ceiling_tokens, 0, 0)
        for target in targets:
            seconds = budget.cap(config.ceiling_seconds, reserve=120)

            async def step_b(target: Target = target, seconds: float = seconds) -> workloads.CeilingResult:
                return await workloads.ceiling(
                    target, observed, streams=config.ceiling_streams, seconds=seconds, knobs=knobs
                )

            result_b = await _phase(
                results, budget, f"(b) ceiling {target.name} for {seconds:.0f}s", step_b, reserve=120
            )
            if result_b is not None:
                results.ceiling[target.name] = result_b
                log(budget, "  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in result_b.cpu.items()))
            await settle()

    gateway_target = targets[1]
    if "c" in config.workloads:

        async def step_c() -> workloads.ReplayResult:
            return await workloads.replay(
                gateway_target,
                events=config.replay_events,
                repetitions=config.replay_reps,
                limit_s=budget.cap(120, reserve=60),
            )

        results.replay = await _phase(results, budget, "(c) replay", step_c, reserve=60)
        await settle()

    if "d" in config.workloads:
        # A fresh gateway of its own (own key prefix, so nobody else's sweeper adopts its runs): its idle RSS is
        # not inflated by the heap the other workloads left behind. The main gateway is stopped first.
        group.stop(gateway)
        fresh = procs.start_gateway(
            group, name="gateway-memory", redis_url=redis_url, simulator_url=simulator.url, key_prefix="rgwmem"
        )
        fresh_target = Target("gateway", f"{fresh.url}/v1", pid=fresh.pid, background=True)

        async def step_d() -> workloads.MemoryResult:
            return await workloads.memory(
                fresh_target,
                simulator.url,
                runs=config.memory_runs,
                in_flight=config.memory_in_flight,
                limit_s=budget.cap(150, reserve=10),
                warm_up=lambda: workloads.warm_up(fresh_target),
            )

        results.memory = await _phase(results, budget, "(d) memory", step_d, reserve=10)


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    config = Config.from_env()
    budget = Budget(config.budget_seconds)
    now = dt.datetime.now().astimezone()
    results = report.BenchResults(
        date=now.date().isoformat(),
        header={"started": now.strftime("%Y-%m-%d %H:%M:%S %Z"), **machine_header()},
        params=config.params(),
        targets=["direct", "gateway", "litellm"],
    )
    workdir = Path(tempfile.mkdtemp(prefix="responses-gateway-bench-"))
    group = procs.ProcessGroup(workdir)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    failed = False
    try:
        asyncio.run(run(config, group, budget, results))
    except BaseException as error:
        failed = True
        results.notes.append(f"benchmark aborted: {workloads.error_label(error)}")
        print(f"bench: aborted: {error!r}", file=sys.stderr)
        for proc in group.procs:
            tail = proc.log_tail(10)
            if tail:
                print(f"--- {proc.name} log tail ---\n{tail}", file=sys.stderr)
    finally:
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
    # A partial run (BENCH_WORKLOADS=b, ...) gets a name of its own, so it never replaces the day's full report.
    partial = "" if config.workloads >= ALL_WORKLOADS else "-" + "".join(sorted(config.workloads))
    path = config.results_dir / f"{results.date}{partial}.md"
    path.write_text(text)
    print(text)
    print(f"bench: wrote {path.relative_to(procs.ROOT) if path.is_relative_to(procs.ROOT) else path}", file=sys.stderr)
    if failed or results.log_problems:
        print(f"bench: process logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
