"""Percentiles and the markdown report: one table, a column per target, ratios against the direct upstream."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.workloads import CeilingResult, ConcurrencyResult, MemoryResult, ReplayResult

DASH = "—"
NOT_INSTALLED = "not installed"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def fmt_signed(value: float | None, digits: int = 1) -> str:
    if value is None:
        return DASH
    return f"{value:+,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return DASH
    return f"{value / base:.2f}x"


def error_summary(errors: Counter[str]) -> str:
    total = sum(errors.values())
    if not total:
        return "0"
    top, count = errors.most_common(1)[0]
    more = f" +{len(errors) - 1} kinds" if len(errors) > 1 else ""
    return f"**{total}** ({count}x {top[:60]}{more})"


@dataclass
class BenchResults:
    """Everything one run of the benchmark measured."""

    date: str
    header: dict[str, str]  # machine and run facts, in order
    params: dict[str, str]
    targets: list[str]  # column order; "direct" first
    unavailable: dict[str, str] = field(default_factory=dict)  # target -> why it has no numbers
    concurrency: dict[str, ConcurrencyResult] = field(default_factory=dict)
    light: dict[str, ConcurrencyResult] = field(default_factory=dict)  # the same pace at a light concurrency
    ceiling: dict[str, CeilingResult] = field(default_factory=dict)
    replay: ReplayResult | None = None
    memory: MemoryResult | None = None
    notes: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)  # WARNING/ERROR lines of the processes' logs


Cell = Callable[[str], float | None]


class _Table:
    def __init__(self, results: BenchResults) -> None:
        self.results = results
        self.columns: list[tuple[str, str | None]] = []  # (target, ratio-of target or None)
        for target in results.targets:
            self.columns.append((target, None))
            if target != "direct" and target not in results.unavailable:
                self.columns.append((target, "ratio"))
        self.rows: list[list[str]] = []

    def header(self) -> list[str]:
        names = ["metric"]
        for target, kind in self.columns:
            names.append(f"{target} ÷ direct" if kind else target)
        return names

    def _unavailable(self, target: str) -> str | None:
        return self.results.unavailable.get(target)

    def numeric(
        self,
        label: str,
        cell: Cell,
        *,
        digits: int = 1,
        with_ratio: bool = False,
        only: Sequence[str] | None = None,
        signed: bool = False,
    ) -> None:
        row = [label]
        base = cell("direct") if "direct" in self.results.targets else None
        for target, kind in self.columns:
            missing = self._unavailable(target)
            if missing is not None:
                row.append(missing)
                continue
            if only is not None and target not in only:
                row.append(DASH)
                continue
            value = cell(target)
            if kind:
                row.append(ratio(value, base) if with_ratio else DASH)
            else:
                row.append(fmt_signed(value, digits) if signed else fmt(value, digits))
        self.rows.append(row)

    def text(self, label: str, cell: Callable[[str], str | None]) -> None:
        row = [label]
        for target, kind in self.columns:
            missing = self._unavailable(target)
            if missing is not None:
                row.append(missing)
            elif kind:
                row.append(DASH)
            else:
                row.append(cell(target) or DASH)
        self.rows.append(row)

    def section(self, title: str) -> None:
        self.rows.append([f"**{title}**"] + [""] * len(self.columns))

    def render(self) -> str:
        header = self.header()
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _utilisation(cpu: dict[str, float], seconds: float) -> str | None:
    """CPU of each process over the window as % of one core: proxy / simulator / Redis / bench client / every
    other process on the machine."""
    if not seconds:
        return None
    parts = [cpu.get(name) for name in ("target", "simulator", "redis", "client", "others")]
    return " / ".join(DASH if used is None else f"{100 * used / seconds:.0f}" for used in parts)


def _concurrency_block(table: _Table, title: str, conc: dict[str, ConcurrencyResult], proxies: list[str]) -> None:
    def pct(attr: str, q: float) -> Cell:
        def cell(target: str) -> float | None:
            result = conc.get(target)
            return percentile(getattr(result, attr), q) if result else None

        return cell

    def added(attr: str, q: float) -> Cell:
        def cell(target: str) -> float | None:
            if target == "direct":
                return None
            mine, base = pct(attr, q)(target), pct(attr, q)("direct")
            return None if mine is None or base is None else mine - base

        return cell

    def proxy_cpu(target: str) -> float | None:
        result = conc.get(target)
        if result is None or not result.events or "target" not in result.cpu:
            return None
        return result.cpu["target"] * 1000 / (result.events / 1000)

    table.section(title)
    table.numeric("added TTFT p50 (ms)", added("ttft_ms", 50), only=proxies, signed=True)
    table.numeric("added TTFT p99 (ms)", added("ttft_ms", 99), only=proxies, signed=True)
    table.numeric("added inter-event delay p50 (ms)", added("gaps_ms", 50), only=proxies, signed=True, digits=2)
    table.numeric("added inter-event delay p99 (ms)", added("gaps_ms", 99), only=proxies, signed=True, digits=2)
    table.numeric("TTFT p50 (ms)", pct("ttft_ms", 50), with_ratio=True)
    table.numeric("TTFT p99 (ms)", pct("ttft_ms", 99), with_ratio=True)
    table.numeric("inter-event delay p50 (ms)", pct("gaps_ms", 50), with_ratio=True, digits=2)
    table.numeric("inter-event delay p99 (ms)", pct("gaps_ms", 99), with_ratio=True, digits=2)
    table.numeric("stream duration p50 (s)", pct("durations_s", 50), with_ratio=True, digits=2)
    table.numeric("stream duration p99 (s)", pct("durations_s", 99), with_ratio=True, digits=2)
    table.numeric("proxy CPU ms per 1k events", proxy_cpu, only=proxies, digits=0)
    table.text(
        "CPU % of a core: proxy / sim / Redis / client / others",
        lambda t: _utilisation(conc[t].cpu, conc[t].wall_s) if t in conc else None,
    )
    table.text("streams completed / started", lambda t: f"{conc[t].completed}/{conc[t].streams}" if t in conc else None)
    table.text(
        "upstream requests / streams",
        lambda t: f"{conc[t].upstream_requests}/{conc[t].streams}" if t in conc else None,
    )
    table.text("errors", lambda t: error_summary(conc[t].errors) if t in conc else None)


def _build_table(results: BenchResults) -> _Table:
    table = _Table(results)
    ceil = results.ceiling

    def ceil_value(get: Callable[[CeilingResult], float | None]) -> Cell:
        def cell(target: str) -> float | None:
            result = ceil.get(target)
            return get(result) if result else None

        return cell

    p = results.params
    proxies = [t for t in results.targets if t != "direct"]
    pace = f"{p['tokens']} tokens, {p['token_delay_ms']} ms apart, TTFT {p['ttft_ms']} ms"
    _concurrency_block(table, f"(a) concurrency: {p['concurrency']} streams x {pace}", results.concurrency, proxies)
    if results.light:
        _concurrency_block(
            table,
            f"(a') light load, same pace: {p['light_concurrency']} streams x {pace}",
            results.light,
            proxies,
        )

    table.section(
        f"(b) ceiling: {p['ceiling_streams']} streams x {p['ceiling_tokens']} tokens at full speed, "
        f"{p['ceiling_seconds']} s"
    )
    table.numeric(
        "events/s ceiling (received by clients)", ceil_value(lambda r: r.events_per_s), with_ratio=True, digits=0
    )
    table.numeric("proxy CPU ms per 1k events", ceil_value(lambda r: r.cpu_ms_per_1k("target")), only=proxies, digits=2)
    table.numeric("Redis CPU ms per 1k events", ceil_value(lambda r: r.cpu_ms_per_1k("redis")), digits=2)
    table.numeric("simulator CPU ms per 1k events", ceil_value(lambda r: r.cpu_ms_per_1k("simulator")), digits=2)
    table.numeric("bench client CPU ms per 1k events", ceil_value(lambda r: r.cpu_ms_per_1k("client")), digits=2)

    def projected(result: CeilingResult) -> float | None:
        cost = result.cpu_ms_per_1k("target")
        return 1_000_000 / cost if cost else None

    table.numeric(
        "projected proxy ceiling at 100% of one core (events/s)", ceil_value(projected), only=proxies, digits=0
    )
    table.text(
        "CPU % of a core: proxy / sim / Redis / client / others",
        lambda t: _utilisation(ceil[t].cpu, ceil[t].seconds) if t in ceil else None,
    )
    table.text(
        "upstream requests / streams started",
        lambda t: f"{ceil[t].upstream_requests}/{ceil[t].responses_started}" if t in ceil else None,
    )
    table.text("errors", lambda t: error_summary(ceil[t].errors) if t in ceil else None)

    replay, memory = results.replay, results.memory
    table.section(f"(c) replay of a finished {p['replay_events']}-event response, median of {p['replay_reps']}")
    gateway_only = ["gateway"]
    table.numeric(
        f"replay seconds for {p['replay_events']} events",
        lambda t: replay.median_seconds if replay else None,
        only=gateway_only,
        digits=3,
    )
    table.numeric(
        "replay events/s",
        lambda t: (
            replay.median_frames / replay.median_seconds
            if replay and replay.median_seconds and replay.median_frames
            else None
        ),
        only=gateway_only,
        digits=0,
    )
    table.text(
        "events replayed (frames counted)",
        lambda t: str(replay.median_frames) if t == "gateway" and replay and replay.median_frames else None,
    )
    table.numeric(
        "seconds to generate + store it (one run, full speed)",
        lambda t: replay.create_seconds if replay else None,
        only=gateway_only,
        digits=2,
    )
    table.text("errors", lambda t: error_summary(replay.errors) if t == "gateway" and replay else None)

    table.section(f"(d) memory: {p['memory_runs']} background runs in progress, no subscribers (fresh gateway)")
    table.numeric(
        "RSS idle (MiB)",
        lambda t: memory.rss_idle_kib / 1024 if memory and memory.rss_idle_kib else None,
        only=gateway_only,
    )
    table.numeric(
        f"RSS with {p['memory_runs']} active runs (MiB)",
        lambda t: memory.rss_loaded_kib / 1024 if memory and memory.rss_loaded_kib else None,
        only=gateway_only,
    )
    table.numeric("RSS KiB per active run", lambda t: memory.kib_per_run if memory else None, only=gateway_only)
    table.text(
        "runs created / in flight at the simulator / sampled in_progress",
        lambda t: (
            f"{memory.created} / {memory.in_flight} / {memory.sampled_in_progress}"
            if t == "gateway" and memory
            else None
        ),
    )
    table.text("errors", lambda t: error_summary(memory.errors) if t == "gateway" and memory else None)
    return table


def _error_details(results: BenchResults) -> list[str]:
    lines: list[str] = []
    groups: list[tuple[str, Counter[str]]] = []
    for target, conc in results.concurrency.items():
        groups.append((f"(a) {target}", conc.errors))
        if conc.wrong_length:
            groups.append(
                (
                    f"(a) {target}",
                    Counter({"completed with a delta count other than the knob (ignored?)": conc.wrong_length}),
                )
            )
    for target, ceil in results.ceiling.items():
        groups.append((f"(b) {target}", ceil.errors))
    if results.replay:
        groups.append(("(c) gateway", results.replay.errors))
    if results.memory:
        groups.append(("(d) gateway", results.memory.errors))
    for where, errors in groups:
        for message, count in errors.most_common():
            lines.append(f"- {where}: {count}x `{message}`")
    return lines


SATURATED_PERCENT = 90
OTHERS_PERCENT = 15


def derive_notes(results: BenchResults, nominal_stream_s: float) -> list[str]:
    """What a reader must know to read the numbers: saturated clients, a direct baseline that could not keep the
    simulator's pace, negative "added" values."""
    notes: list[str] = []
    for block, found in (("(a)", results.concurrency), ("(a')", results.light)):
        for target, conc in found.items():
            client = 100 * conc.cpu.get("client", 0.0) / conc.wall_s if conc.wall_s else 0.0
            if client >= SATURATED_PERCENT:
                notes.append(
                    f"{block} {target}: the bench client used {client:.0f}% of a core: it is a bottleneck, so "
                    "TTFT and inter-event delays include its own queueing."
                )
            duration = percentile(conc.durations_s, 50)
            if target == "direct" and duration is not None and duration > 1.25 * nominal_stream_s:
                notes.append(
                    f"{block} direct: median stream took {duration:.1f} s against {nominal_stream_s:.2f} s of "
                    "simulated pace: even without a proxy this machine cannot keep the pace at this concurrency, so "
                    "events arrive in bursts (tiny p50, huge p99 inter-event delay) and the added inter-event "
                    "delay can come out negative."
                )
        if "direct" in found:
            base = found["direct"]
            for target, conc in found.items():
                if target == "direct":
                    continue
                for label, attr in (("TTFT", "ttft_ms"), ("inter-event delay", "gaps_ms")):
                    for q in (50, 99):
                        mine, ref = percentile(getattr(conc, attr), q), percentile(getattr(base, attr), q)
                        if mine is not None and ref is not None and mine < ref - max(1.0, 0.05 * ref):
                            notes.append(
                                f"{block} {target}: added {label} p{q} is negative ({mine - ref:+.1f} ms): "
                                "the direct baseline was worse at that percentile (see the saturation notes)."
                            )
    windows: list[tuple[str, dict[str, float], float]] = [
        (f"{block} {target}", conc.cpu, conc.wall_s)
        for block, found in (("(a')", results.light), ("(a)", results.concurrency))
        for target, conc in found.items()
    ]
    windows += [(f"(b) {target}", ceil.cpu, ceil.seconds) for target, ceil in results.ceiling.items()]
    for where, cpu, seconds in windows:
        others = 100 * cpu.get("others", 0.0) / seconds if seconds else 0.0
        if others >= OTHERS_PERCENT:
            notes.append(
                f"{where}: processes outside the benchmark used {others:.0f}% of a core meanwhile: the machine was "
                "not quiet, these numbers are disturbed."
            )
    for block, found in (("(a')", results.light), ("(a)", results.concurrency)):
        for target, conc in found.items():
            extra = (conc.upstream_requests or 0) - conc.streams
            if extra > 0:
                notes.append(
                    f"{block} {target}: the simulator received {extra} more request(s) than there were streams: "
                    "runs were started again upstream (e.g. a run restarted after its lease was lost)."
                )
    for target, ceil in results.ceiling.items():
        extra = (ceil.upstream_requests or 0) - ceil.responses_started
        if extra > 0:
            notes.append(f"(b) {target}: {extra} upstream request(s) more than streams started (runs restarted).")
        client = 100 * ceil.cpu.get("client", 0.0) / ceil.seconds if ceil.seconds else 0.0
        if client >= SATURATED_PERCENT:
            notes.append(
                f"(b) {target}: the bench client used {client:.0f}% of a core: its events/s is the limit of one "
                "Python process parsing events with the openai SDK, not necessarily the target's. The proxy's CPU "
                "per 1k events (and the projection from it) does not depend on that."
            )
    return notes


def render(results: BenchResults) -> str:
    out = [f"# responses-gateway benchmark, {results.date}", ""]
    out += [f"- **{key}**: {value}" for key, value in results.header.items()]
    out.append("- **parameters**: " + ", ".join(f"{key}={value}" for key, value in results.params.items()))
    out += ["", _build_table(results).render(), ""]
    details = _error_details(results)
    out += ["## Errors", ""] + (details or ["None."]) + [""]
    if results.log_problems:
        out += ["## Warnings and errors in the processes' logs", ""]
        out += [f"- {line}" for line in results.log_problems] + [""]
    if results.notes:
        out += ["## Notes", ""] + [f"- {note}" for note in results.notes] + [""]
    out += [
        "Added = the proxy's percentile minus the direct percentile of the same run. Inter-event delay = time",
        "between consecutive `response.output_text.delta` events of one stream, all streams pooled. CPU from",
        "/proc/<pid>/stat (utime+stime) over the measured window. See bench/README.md.",
        "",
    ]
    return "\n".join(out)
