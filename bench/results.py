"""Everything one run measured, and its numbers as the report shows them: each the median over the interleaved
repetitions, a proxy's "added" latency paired with the direct run of the same repetition."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.profile import Profile
from bench.replica_acks import AckLatency
from bench.stats import median, median_of, percentile
from bench.store_bytes import StoreBytesResult
from bench.workloads import CeilingResult, ConcurrencyResult, MemoryResult, ReplayResult

LABELS = {
    "direct": "direct",
    "bare": "bare proxy",
    "redis": "gateway (Redis)",
    "embedded": "gateway (embedded)",
    "cluster": "gateway (Redis Cluster)",
    "cluster-acks": "gateway (Redis Cluster, replica_acks 1)",
    "litellm": "LiteLLM",
}
LIGHT, HEAVY = "light", "heavy"


@dataclass
class BenchResults:
    date: str
    header: dict[str, str]  # machine and run facts, in order
    params: dict[str, str]
    targets: list[str]  # column order; "direct" first
    unavailable: dict[str, str] = field(default_factory=dict)  # target -> why it has no numbers
    light: dict[str, list[ConcurrencyResult]] = field(default_factory=dict)  # (a'), one entry per repetition
    concurrency: dict[str, list[ConcurrencyResult]] = field(default_factory=dict)  # (a)
    ceiling: dict[str, list[CeilingResult]] = field(default_factory=dict)
    replay: dict[str, ReplayResult] = field(default_factory=dict)
    memory: dict[str, MemoryResult] = field(default_factory=dict)
    store: StoreBytesResult | None = None  # (e), the embedded store's bytes per event (the "embedded" column)
    replica_acks: AckLatency | None = None  # (f), the cost of `storage.replica_acks` on the cluster
    profile: Profile | None = None
    profile_window: CeilingResult | None = None  # the ceiling window py-spy sampled (not in the medians)
    profile_target: str | None = None
    profile_before: str | None = None  # the baseline profile page (markdown), shown beside this run's
    notes: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)  # WARNING/ERROR lines of the processes' logs

    def level(self, level: str) -> dict[str, list[ConcurrencyResult]]:
        return self.light if level == LIGHT else self.concurrency

    def conc(self, level: str, target: str, metric: Callable[[ConcurrencyResult], float | None]) -> float | None:
        return median_of(self.level(level).get(target, []), metric)

    def pct(self, level: str, target: str, attr: str, q: float) -> float | None:
        """Median over repetitions of the q-th percentile of `attr` (ttft_ms, gaps_ms, durations_s)."""
        return self.conc(level, target, lambda run: percentile(getattr(run, attr), q))

    def added(self, level: str, target: str, attr: str, q: float) -> float | None:
        """Median over repetitions of (the target's percentile - direct's percentile in the same repetition)."""
        runs = self.level(level)
        direct = {run.rep: run for run in runs.get("direct", [])}
        differences: list[float | None] = []
        for run in runs.get(target, []):
            base = direct.get(run.rep)
            if base is None:
                continue
            mine, ref = percentile(getattr(run, attr), q), percentile(getattr(base, attr), q)
            differences.append(None if mine is None or ref is None else mine - ref)
        return median(differences)

    def ceil(self, target: str, metric: Callable[[CeilingResult], float | None]) -> float | None:
        return median_of(self.ceiling.get(target, []), metric)

    def events_per_s(self, target: str) -> float | None:
        return self.ceil(target, lambda run: run.events_per_s)

    def projected_ceiling(self, target: str) -> float | None:
        """1,000,000 / (proxy CPU ms per 1k events): what one process could sustain with a whole core."""
        cost = self.ceil(target, lambda run: run.cpu_ms_per_1k("target"))
        return 1_000_000 / cost if cost else None

    def kib_per_run(self, target: str) -> float | None:
        memory = self.memory.get(target)
        return memory.kib_per_run if memory else None

    def store_overhead(self, target: str) -> float | None:
        """(e) retained bytes minus the events' JSON bytes, per stored event; the embedded store only."""
        return self.store.overhead_per_event if target == "embedded" and self.store else None

    def replay_ms(self, target: str) -> float | None:
        replay = self.replay.get(target)
        seconds = replay.median_seconds if replay else None
        return None if seconds is None else seconds * 1000


def total_errors(runs: list[ConcurrencyResult] | list[CeilingResult]) -> Counter[str]:
    found: Counter[str] = Counter()
    for run in runs:
        found.update(run.errors)
    return found
