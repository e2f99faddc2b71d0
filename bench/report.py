"""The markdown report: the targets table, one table of medians with a column per target and ratios against the
direct upstream (and where the embedded store's bytes go), each repetition with the machine's load, the profiles
before and after, errors and notes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from bench import profile, replica_acks, targets
from bench.results import HEAVY, LABELS, LIGHT, BenchResults, total_errors
from bench.stats import median, percentile
from bench.workloads import CeilingResult, ConcurrencyResult, Measured

__all__ = ["NOT_INSTALLED", "BenchResults", "derive_notes", "render", "render_profile_page"]

DASH = "—"
NOT_INSTALLED = "not installed"
PROCESSES = ("target", "simulator", "redis", "client", "others")


def fmt(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def fmt_signed(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:+,.{digits}f}"


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


Cell = Callable[[str], float | None]


class _Table:
    def __init__(self, results: BenchResults) -> None:
        self.results = results
        self.columns: list[tuple[str, bool]] = []  # (target, is the ratio-to-direct column)
        for target in results.targets:
            self.columns.append((target, False))
            if target != "direct" and target not in results.unavailable:
                self.columns.append((target, True))
        self.rows: list[list[str]] = []

    def header(self) -> list[str]:
        return ["metric"] + [f"{LABELS[t]} ÷ direct" if is_ratio else LABELS[t] for t, is_ratio in self.columns]

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
        base = cell("direct") if with_ratio else None
        for target, is_ratio in self.columns:
            missing = self.results.unavailable.get(target)
            if missing is not None:
                row.append(missing)
            elif only is not None and target not in only:
                row.append(DASH)
            elif is_ratio:
                row.append(ratio(cell(target), base) if with_ratio else DASH)
            else:
                row.append(fmt_signed(cell(target), digits) if signed else fmt(cell(target), digits))
        self.rows.append(row)

    def text(self, label: str, cell: Callable[[str], str | None]) -> None:
        row = [label]
        for target, is_ratio in self.columns:
            missing = self.results.unavailable.get(target)
            row.append(missing if missing is not None else DASH if is_ratio else cell(target) or DASH)
        self.rows.append(row)

    def section(self, title: str) -> None:
        self.rows.append([f"**{title}**"] + [""] * len(self.columns))

    def render(self) -> str:
        header = self.header()
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _utilisation(runs: Sequence[Measured]) -> str | None:
    """Median CPU of each process over the windows as % of one core: proxy / simulator / Redis / bench client /
    everything else on the machine."""
    if not runs:
        return None
    parts = []
    for name in PROCESSES:
        used = median(100 * run.cpu[name] / run.wall_s if name in run.cpu and run.wall_s else None for run in runs)
        parts.append(DASH if used is None else f"{used:.0f}")
    return " / ".join(parts)


def _shared_rows(table: _Table, runs: dict[str, list[ConcurrencyResult]] | dict[str, list[CeilingResult]]) -> None:
    """Rows every (a) and (b) block has: Redis traffic per event, CPU split, machine load, errors."""

    def metric(get: Callable[[Measured], float | None]) -> Cell:
        return lambda target: median(get(run) for run in runs.get(target, []))

    table.numeric(
        "Redis commands per event (all clients of that Redis)", metric(lambda r: r.redis_per_event()), digits=2
    )
    table.numeric("bytes sent to Redis per event", metric(lambda r: r.redis_bytes_per_event()), digits=0)
    table.text("CPU % of a core: proxy / sim / Redis / client / others", lambda t: _utilisation(runs.get(t, [])))
    table.numeric("machine busy, % of all cores", metric(lambda r: r.load.busy_percent), digits=0)
    table.text("errors (all repetitions)", lambda t: error_summary(total_errors(runs[t])) if t in runs else None)


def _concurrency_block(table: _Table, title: str, results: BenchResults, level: str) -> None:
    runs = results.level(level)
    proxies = [t for t in results.targets if t != "direct"]

    def pct(attr: str, q: float) -> Cell:
        return lambda target: results.pct(level, target, attr, q)

    def added(attr: str, q: float) -> Cell:
        return lambda target: results.added(level, target, attr, q)

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
    table.numeric(
        "proxy CPU ms per 1k events",
        lambda t: results.conc(level, t, lambda run: run.cpu_ms_per_1k("target")),
        only=proxies,
        digits=0,
    )
    _shared_rows(table, runs)

    table.text(
        "streams completed / started (all repetitions)",
        lambda t: f"{sum(r.completed for r in runs[t])}/{sum(r.streams for r in runs[t])}" if t in runs else None,
    )
    table.text(
        "upstream requests / streams (all repetitions)",
        lambda t: (
            f"{sum(r.upstream_requests or 0 for r in runs[t])}/{sum(r.streams for r in runs[t])}" if t in runs else None
        ),
    )


def _ceiling_block(table: _Table, results: BenchResults) -> None:
    p = results.params
    proxies = [t for t in results.targets if t != "direct"]
    table.section(
        f"(b) ceiling: {p['ceiling_streams']} streams x {p['ceiling_tokens']} tokens at full speed, "
        f"{p['ceiling_seconds']} s"
    )
    table.numeric("events/s ceiling (received by clients)", results.events_per_s, with_ratio=True, digits=0)

    def cpu_per_1k(process: str) -> Cell:
        return lambda target: results.ceil(target, lambda run: run.cpu_ms_per_1k(process))

    table.numeric("proxy CPU ms per 1k events", cpu_per_1k("target"), only=proxies, digits=2)
    table.numeric("Redis CPU ms per 1k events", cpu_per_1k("redis"), digits=2)
    table.numeric("simulator CPU ms per 1k events", cpu_per_1k("simulator"), digits=2)
    table.numeric("bench client CPU ms per 1k events", cpu_per_1k("client"), digits=2)
    table.numeric(
        "projected proxy ceiling at 100% of one core (events/s)", results.projected_ceiling, only=proxies, digits=0
    )
    _shared_rows(table, results.ceiling)
    runs = results.ceiling
    table.text(
        "upstream requests / streams started (all repetitions)",
        lambda t: (
            f"{sum(r.upstream_requests or 0 for r in runs[t])}/{sum(r.responses_started for r in runs[t])}"
            if t in runs
            else None
        ),
    )


def _replay_block(table: _Table, results: BenchResults) -> None:
    p = results.params
    replay = results.replay
    stored = list(replay)
    table.section(f"(c) replay of a finished {p['replay_events']}-event response, median of {p['replay_reps']}")
    table.numeric("replay ms to last byte", results.replay_ms, only=stored, digits=1)

    def events_per_s(target: str) -> float | None:
        found = replay.get(target)
        if found is None or not found.median_seconds or not found.median_frames:
            return None
        return found.median_frames / found.median_seconds

    table.numeric("replay events/s", events_per_s, only=stored, digits=0)
    table.text("events replayed (frames counted)", lambda t: str(replay[t].median_frames) if t in replay else None)
    table.numeric(
        "seconds to generate + store it (one run, full speed)",
        lambda t: replay[t].create_seconds if t in replay else None,
        only=stored,
        digits=2,
    )
    table.text("errors", lambda t: error_summary(replay[t].errors) if t in replay else None)


def _memory_block(table: _Table, results: BenchResults) -> None:
    memory = results.memory
    runs = results.params["memory_runs"]
    stored = list(memory)
    table.section(f"(d) memory: {runs} background runs in progress, no subscribers (fresh gateway)")

    def kib(get: Callable[[str], int | None]) -> Cell:
        return lambda t: None if t not in memory or get(t) is None else (get(t) or 0) / 1024

    table.numeric("RSS idle (MiB)", kib(lambda t: memory[t].rss_idle_kib), only=stored)
    table.numeric(f"RSS with {runs} active runs (MiB)", kib(lambda t: memory[t].rss_loaded_kib), only=stored)
    table.numeric("RSS KiB per active run", lambda t: memory[t].kib_per_run if t in memory else None, only=stored)
    table.text(
        "runs created / in flight at the simulator / sampled in_progress",
        lambda t: (
            f"{memory[t].created} / {memory[t].in_flight} / {memory[t].sampled_in_progress}" if t in memory else None
        ),
    )
    table.text("errors", lambda t: error_summary(memory[t].errors) if t in memory else None)


def _store_block(table: _Table, results: BenchResults) -> None:
    store = results.store
    assert store is not None
    table.section(
        f"(e) embedded store: {store.deltas:,} text deltas in {store.responses} responses, written through the run's "
        "event log in the bench process, tracemalloc"
    )
    only = ["embedded"]

    def embedded(value: float | None) -> Cell:
        return lambda target: value if target == "embedded" else None

    table.numeric("retained bytes per stored event", embedded(store.retained_per_event), only=only, digits=0)
    table.numeric("event JSON bytes per event (mean len of data)", embedded(store.json_per_event), only=only, digits=0)
    table.numeric("overhead per event (retained - JSON)", embedded(store.overhead_per_event), only=only, digits=0)
    table.text(
        "events measured (lifecycle and framing included)", lambda t: f"{store.events:,}" if t == "embedded" else None
    )
    if store.delta_untrimmed_bytes is not None and store.delta_trimmed_bytes is not None:
        table.text(
            "a text delta's bytes: held as orjson returns them / trimmed / JSON length",
            lambda t: (
                f"{store.delta_untrimmed_bytes:,.0f} / {store.delta_trimmed_bytes:,.0f} / {store.delta_json_bytes:,.0f}"
                if t == "embedded"
                else None
            ),
        )


def _store_lines(results: BenchResults) -> list[str]:
    """Where the embedded store's retained bytes were allocated: the largest source lines (tracemalloc)."""
    store = results.store
    if store is None or not store.lines or not store.events:
        return []
    lines = [
        "### (e) Where the embedded store's retained bytes were allocated",
        "",
        f"tracemalloc, one frame: the source lines that allocated the most of the {store.retained_bytes / 1024:,.0f} "
        "KiB the store kept. The store's copy line (`_kept`) holds the events' JSON itself; the bench's "
        "`orjson.loads` line stands for the upstream client's parse (the event's `type` string, kept by each stored "
        "event).",
        "",
        "| source line | code | KiB | allocations | B per event |",
        "|---|---|---:|---:|---:|",
    ]
    for line in store.lines:
        code = line.code.replace("|", "\\|")
        lines.append(
            f"| {line.where} | `{code}` | {line.size / 1024:,.0f} | {line.count:,} | {line.size / store.events:,.1f} |"
        )
    return [*lines, ""]


def _build_table(results: BenchResults) -> _Table:
    table = _Table(results)
    p = results.params
    pace = f"{p['tokens']} tokens, {p['token_delay_ms']} ms apart, TTFT {p['ttft_ms']} ms"
    if results.light:
        title = f"(a') light load: {p['light_concurrency']} streams x {pace}"
        _concurrency_block(table, title, results, LIGHT)
    if results.concurrency:
        _concurrency_block(table, f"(a) concurrency: {p['concurrency']} streams x {pace}", results, HEAVY)
    if results.ceiling:
        _ceiling_block(table, results)
    if results.replay:
        _replay_block(table, results)
    if results.memory:
        _memory_block(table, results)
    if results.store is not None and "embedded" in results.targets:
        _store_block(table, results)
    return table


def _repetitions(results: BenchResults) -> list[str]:
    """Each repetition's headline number with the machine's load during it, so a disturbed one shows."""
    reps = max(
        int(results.params["reps"]),
        int(results.params.get("light_reps", 0)) if results.light else 0,
        int(results.params["replay_reps"]) if results.replay else 0,
    )
    lines = [
        "Each cell: the repetition's headline number · busy % of all cores during its window (/proc/stat) · "
        "1-minute loadavg at its end. Repetitions ran interleaved: every target once, then every target again.",
        "",
        "| workload | target | " + " | ".join(f"rep {n}" for n in range(1, reps + 1)) + " |",
        "|---|---|" + "---:|" * reps,
    ]

    def row(workload: str, target: str, runs: Sequence[Measured], headline: Callable[[Measured], str]) -> None:
        by_rep = {run.rep: run for run in runs}
        cells = []
        for n in range(1, reps + 1):
            run = by_rep.get(n)
            cells.append(
                DASH if run is None else f"{headline(run)} · {run.load.busy_percent:.0f}% · {run.load.loadavg_1m:.2f}"
            )
        lines.append(f"| {workload} | {LABELS[target]} | " + " | ".join(cells) + " |")

    def ttft_p99(run: Measured) -> str:
        assert isinstance(run, ConcurrencyResult)
        return f"TTFT p99 {fmt(percentile(run.ttft_ms, 99))} ms"

    for block, found in (("(a')", results.light), ("(a)", results.concurrency)):
        for target, runs in found.items():
            row(block, target, runs, ttft_p99)
    for target, ceiling_runs in results.ceiling.items():
        row("(b)", target, ceiling_runs, lambda run: f"{run.events / run.wall_s:,.0f} ev/s" if run.wall_s else DASH)
    for target, replay in results.replay.items():
        cells = [
            f"{seconds * 1000:.1f} ms · {load.busy_percent:.0f}% · {load.loadavg_1m:.2f}"
            for seconds, load in zip(replay.seconds, replay.loads, strict=True)
        ]
        cells += [DASH] * (reps - len(cells))
        lines.append(f"| (c) | {LABELS[target]} | " + " | ".join(cells) + " |")
    return lines


def _profile_body(results: BenchResults) -> list[str]:
    """This run's profile: what was sampled, then the top functions by self time."""
    found, window = results.profile, results.profile_window
    if found is None:
        return ["Not recorded (py-spy missing, BENCH_PROFILE_SECONDS=0, or workload b not run)."]
    p = results.params
    target = LABELS.get(results.profile_target or "", "?")
    lines = [
        f"- **target**: {target}, sampled by py-spy at {profile.SAMPLE_RATE_HZ} Hz, only while it held the GIL "
        f"during an extra (b) ceiling window ({p['ceiling_streams']} streams x {p['ceiling_tokens']} tokens at full "
        f"speed, {p['profile_seconds']} s) that is not part of the medians",
        f"- **gateway commit**: {results.header.get('gateway commit', '?')}",
    ]
    if window is not None and window.wall_s:
        cpu = 100 * window.cpu.get("target", 0.0) / window.wall_s
        lines.append(
            f"- **window**: {window.events_per_s:,.0f} events/s received by the clients, gateway at {cpu:.0f}% of a "
            f"core ({fmt(window.cpu_ms_per_1k('target'), 1)} ms CPU per 1k events), {found.samples} samples"
        )
    lines += [
        "",
        "*self %* = share of the samples with the function on top of the stack (its own code); *total %* = with the "
        "function anywhere on the stack. Samples are taken only while a thread holds the GIL (`py-spy --gil`): the "
        "process's Python CPU, without waits (an idle thread-pool worker would otherwise look busy).",
        "",
        profile.render_table(found),
    ]
    return lines


def render_profile_page(results: BenchResults) -> str:
    """This run's profile alone: the page a later run shows as its "before"."""
    lines = [f"# Gateway profile, {results.date}", "", *_profile_body(results), ""]
    return "\n".join(lines)


def _profile_section(results: BenchResults) -> list[str]:
    lines = [f"## Profile: top {profile.TOP} functions of the gateway by self time", "", "### After: this run", ""]
    lines += _profile_body(results)
    lines += ["", "### Before: the baseline of issue 13 (bench/results/profile-before-issue13.md)", ""]
    if results.profile_before:
        body = results.profile_before.strip().splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]
        while body and not body[0].strip():
            body = body[1:]
        lines += body
    else:
        lines.append("No baseline file.")
    return [*lines, ""]


def _error_details(results: BenchResults) -> list[str]:
    lines: list[str] = []
    groups: list[tuple[str, Counter[str]]] = []
    for block, found in (("(a')", results.light), ("(a)", results.concurrency)):
        for target, runs in found.items():
            groups.append((f"{block} {target}", total_errors(runs)))
            wrong = sum(run.wrong_length for run in runs)
            if wrong:
                message = "completed with a delta count other than the knob (ignored?)"
                groups.append((f"{block} {target}", Counter({message: wrong})))
    for target, ceiling_runs in results.ceiling.items():
        groups.append((f"(b) {target}", total_errors(ceiling_runs)))
    for target, replay in results.replay.items():
        groups.append((f"(c) {target}", replay.errors))
    for target, memory in results.memory.items():
        groups.append((f"(d) {target}", memory.errors))
    for where, errors in groups:
        for message, count in errors.most_common():
            lines.append(f"- {where}: {count}x `{message}`")
    return lines


SATURATED_PERCENT = 90
OTHERS_PERCENT = 15


def derive_notes(results: BenchResults, nominal_stream_s: float) -> list[str]:
    """What a reader must know to read the numbers: saturated clients, a direct baseline that could not keep the
    simulator's pace, negative "added" values, a machine that was not quiet, runs restarted upstream."""
    notes: list[str] = []
    for block, level in (("(a')", LIGHT), ("(a)", HEAVY)):
        found = results.level(level)
        for target, runs in found.items():
            client = max((100 * run.cpu.get("client", 0.0) / run.wall_s for run in runs if run.wall_s), default=0.0)
            if client >= SATURATED_PERCENT:
                notes.append(
                    f"{block} {target}: the bench client used up to {client:.0f}% of a core: it is a bottleneck, so "
                    "TTFT and inter-event delays include its own queueing."
                )
            duration = results.pct(level, target, "durations_s", 50)
            if target == "direct" and duration is not None and duration > 1.25 * nominal_stream_s:
                notes.append(
                    f"{block} direct: median stream took {duration:.1f} s against {nominal_stream_s:.2f} s of "
                    "simulated pace: even without a proxy this machine cannot keep the pace at this concurrency, so "
                    "events arrive in bursts and the added inter-event delay can come out negative."
                )
            if target == "direct":
                continue
            for label, attr in (("TTFT", "ttft_ms"), ("inter-event delay", "gaps_ms")):
                for q in (50, 99):
                    added, ref = results.added(level, target, attr, q), results.pct(level, "direct", attr, q)
                    if added is not None and ref is not None and added < -max(1.0, 0.05 * ref):
                        notes.append(
                            f"{block} {target}: added {label} p{q} is negative ({added:+.1f} ms): either the direct "
                            "baseline was worse at that percentile, or events arrived in bursts (several in one read "
                            "share its arrival time, so their gaps are 0)."
                        )
            extra = sum((run.upstream_requests or 0) - run.streams for run in runs)
            if extra > 0:
                notes.append(
                    f"{block} {target}: the simulator received {extra} more request(s) than there were streams: "
                    "runs were started again upstream (e.g. a run restarted after its lease was lost)."
                )
    windows: list[tuple[str, Measured]] = [
        (f"{block} {target} rep {run.rep}", run)
        for block, found in (("(a')", results.light), ("(a)", results.concurrency))
        for target, runs in found.items()
        for run in runs
    ]
    windows += [(f"(b) {target} rep {run.rep}", run) for target, runs in results.ceiling.items() for run in runs]
    disturbed = [
        f"{where} {100 * run.cpu.get('others', 0.0) / run.wall_s:.0f}%"
        for where, run in windows
        if run.wall_s and 100 * run.cpu.get("others", 0.0) / run.wall_s >= OTHERS_PERCENT
    ]
    if disturbed:
        notes.append(
            f"Processes outside the benchmark used {OTHERS_PERCENT}% of a core or more during these windows (the "
            "machine was not quiet; their numbers are disturbed, see the repetitions table): " + ", ".join(disturbed)
        )
    for target, ceiling_runs in results.ceiling.items():
        extra = sum((run.upstream_requests or 0) - run.responses_started for run in ceiling_runs)
        if extra > 0:
            notes.append(f"(b) {target}: {extra} upstream request(s) more than streams started (runs restarted).")
        client = max((100 * run.cpu.get("client", 0.0) / run.wall_s for run in ceiling_runs if run.wall_s), default=0)
        if client >= SATURATED_PERCENT:
            notes.append(
                f"(b) {target}: the bench client used up to {client:.0f}% of a core: its events/s may be the limit of "
                "one Python process reading events, not the target's. The proxy's CPU per 1k events (and the "
                "projection from it) does not depend on that."
            )
    return notes


def _reps_text(results: BenchResults) -> str:
    reps, light = results.params["reps"], results.params.get("light_reps", results.params["reps"])
    return reps if light == reps else f"{light} ((a')) or {reps} (the others)"


def render(results: BenchResults) -> str:
    out = [f"# responses-gateway benchmark, {results.date}", ""]
    out += [f"- **{key}**: {value}" for key, value in results.header.items()]
    out.append("- **parameters**: " + ", ".join(f"{key}={value}" for key, value in results.params.items()))
    out += [
        "",
        "## Targets (issue 13, Done when)",
        "",
        f"Medians of {_reps_text(results)} interleaved repetitions. Both gateway columns are held to each line "
        "(the embedded store: no worse); direct, the bare proxy (`bench/bare_proxy.py`: parse, renumber, write; "
        "no store, nothing else: the floor for any proxy on this machine) and LiteLLM are shown for comparison. "
        "A line without a target is measured for information.",
        "",
        targets.render(results),
        "",
        f"## All numbers (medians of {_reps_text(results)} repetitions)",
        "",
        _build_table(results).render(),
        "",
        *_store_lines(results),
        *(replica_acks.render(results.replica_acks, LABELS) if results.replica_acks is not None else []),
        "## Repetitions and machine load",
        "",
        *_repetitions(results),
        "",
        *_profile_section(results),
    ]
    details = _error_details(results)
    out += ["## Errors", ""] + (details or ["None."]) + [""]
    if results.log_problems:
        out += ["## Warnings and errors in the processes' logs", ""]
        out += [f"- {line}" for line in results.log_problems] + [""]
    if results.notes:
        out += ["## Notes", ""] + [f"- {note}" for note in results.notes] + [""]
    out += [
        "Added = the proxy's percentile minus the direct percentile of the same repetition, then the median over",
        "repetitions. Inter-event delay = time between consecutive `response.output_text.delta` events of one stream,",
        "all streams pooled. CPU from /proc/<pid>/stat (utime+stime) over the measured window. See bench/README.md.",
        "",
    ]
    return "\n".join(out)
