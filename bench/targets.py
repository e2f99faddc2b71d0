"""The "Done when" lines of issue 13, each with its threshold, the measured medians of every column, and PASS/FAIL
for the two gateway columns (the embedded store is held to the same line: "no worse"); lines without a threshold
are measured for information."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.results import HEAVY, LABELS, LIGHT, BenchResults

JUDGED = ("redis", "embedded")
DASH = "—"

Value = Callable[[BenchResults, str], float | None]


@dataclass(frozen=True)
class Goal:
    line: str  # the wording
    threshold: str
    value: Value  # the measured median for one column (None: not measured or not applicable)
    passes: Callable[[float], bool] | None  # None: no threshold, the value is shown for information
    fmt: str  # format of the value, e.g. "{:.1f} ms"
    judged: tuple[str, ...] = JUDGED
    context: Callable[[BenchResults], str] | None = None
    not_applicable: str = DASH  # shown in a gateway column the line does not concern


def _added_ttft_p99(level: str) -> Value:
    return lambda results, target: None if target == "direct" else results.added(level, target, "ttft_ms", 99)


def _proxy_cpu_light(results: BenchResults, target: str) -> float | None:
    return results.conc(LIGHT, target, lambda run: run.cpu_ms_per_1k("target"))


def _redis_per_event_light(results: BenchResults, target: str) -> float | None:
    # The probe reads the single node's INFO: the embedded store has no Redis, the cluster's nodes are not probed.
    if target in ("embedded", "cluster"):
        return None
    return results.conc(LIGHT, target, lambda run: run.redis_per_event())


def _versus_litellm(results: BenchResults, target: str) -> float | None:
    mine, theirs = results.events_per_s(target), results.events_per_s("litellm")
    if target in ("direct", "litellm") or mine is None or not theirs:
        return None
    return mine / theirs


def _ceiling_context(results: BenchResults) -> str:
    parts = []
    for target in JUDGED:
        projected = results.projected_ceiling(target)
        if projected is not None:
            parts.append(f"{LABELS[target]} at 100% of one core: {projected:,.0f}/s")
    return "projected: " + "; ".join(parts) if parts else ""


def _cpu_ratio_context(results: BenchResults) -> str:
    theirs = results.ceil("litellm", lambda run: run.cpu_ms_per_1k("target"))
    parts = []
    for target in JUDGED:
        mine = results.ceil(target, lambda run: run.cpu_ms_per_1k("target"))
        if mine and theirs:
            parts.append(f"{LABELS[target]} {theirs / mine:.1f}x")
    return "LiteLLM's CPU per event ÷ the gateway's, same windows: " + ", ".join(parts) if parts else ""


def _ttft_context(level: str) -> Callable[[BenchResults], str]:
    def context(results: BenchResults) -> str:
        direct = results.pct(level, "direct", "ttft_ms", 99)
        return f"direct TTFT p99 {direct:,.1f} ms" if direct is not None else ""

    return context


def _redis_context(results: BenchResults) -> str:
    written = results.conc(LIGHT, "redis", lambda run: run.redis_bytes_per_event())
    return f"bytes sent to Redis per event: {written:,.0f}" if written is not None else ""


def _store_context(results: BenchResults) -> str:
    store = results.store
    if store is None or store.retained_per_event is None or store.json_per_event is None:
        return ""
    text = (
        f"retained {store.retained_per_event:,.0f} B, JSON {store.json_per_event:,.0f} B per event; "
        f"{store.events:,} events in {store.responses} responses (tracemalloc, in the bench process)"
    )
    if store.delta_untrimmed_bytes is not None and store.delta_trimmed_bytes is not None:
        text += (
            f"; untrimmed, a text delta's bytes would hold {store.delta_untrimmed_bytes:,.0f} B "
            f"instead of {store.delta_trimmed_bytes:,.0f} B"
        )
    return text


def _rss_context(results: BenchResults) -> str:
    parts = [
        f"{LABELS[target]} idle {memory.rss_idle_kib / 1024:,.0f} MiB"
        for target, memory in results.memory.items()
        if memory.rss_idle_kib is not None
    ]
    if not parts:
        return ""
    return f"{results.params['memory_runs']} background runs in progress, fresh gateway; RSS " + ", ".join(parts)


def goals(params: dict[str, str]) -> list[Goal]:
    light, heavy = params["light_concurrency"], params["concurrency"]
    return [
        Goal(
            f"Added TTFT p99 at {light} streams",
            "≤ 8 ms",
            _added_ttft_p99(LIGHT),
            lambda v: v <= 8,
            "{:+,.1f} ms",
            context=_ttft_context(LIGHT),
        ),
        Goal(
            f"Added TTFT p99 at {heavy} streams",
            "≤ 150 ms",
            _added_ttft_p99(HEAVY),
            lambda v: v <= 150,
            "{:+,.1f} ms",
            context=_ttft_context(HEAVY),
        ),
        Goal(
            "Ceiling: persisted events/s per gateway process (received by the clients)",
            "≥ 50,000/s",
            lambda results, target: results.events_per_s(target),
            lambda v: v >= 50_000,
            "{:,.0f}/s",
            context=_ceiling_context,
        ),
        Goal(
            "Ceiling ≥ 10x LiteLLM's in the same run",
            "≥ 10x",
            _versus_litellm,
            lambda v: v >= 10,
            "{:.1f}x",
            context=_cpu_ratio_context,
        ),
        Goal(
            f"Redis commands per event at {light} streams (INFO commandstats, Lua's included)",
            "≤ 2",
            _redis_per_event_light,
            lambda v: v <= 2,
            "{:.2f}",
            judged=("redis",),
            context=_redis_context,
            not_applicable="n/a (no Redis)",
        ),
        Goal(
            f"Gateway CPU per 1k events at {light} streams",
            "≤ 120 ms",
            _proxy_cpu_light,
            lambda v: v <= 120,
            "{:,.0f} ms",
        ),
        Goal(
            f"Replay of a finished {params['replay_events']}-event response, to last byte",
            "≤ 50 ms",
            lambda results, target: results.replay_ms(target),
            lambda v: v <= 50,
            "{:,.1f} ms",
        ),
        Goal(
            "Embedded store: overhead per stored event (retained bytes - event JSON bytes)",
            "≤ 300 B",
            lambda results, target: results.store_overhead(target),
            lambda v: v <= 300,
            "{:,.0f} B",
            judged=("embedded",),
            context=_store_context,
            not_applicable="n/a (events in Redis)",
        ),
        Goal(
            "RSS per active run (background, in progress, nobody subscribed)",
            "measured",
            lambda results, target: results.kib_per_run(target),
            None,
            "{:,.1f} KiB",
            context=_rss_context,
        ),
    ]


def _cell(goal: Goal, results: BenchResults, target: str) -> str:
    if target in results.unavailable:
        return results.unavailable[target]
    value = goal.value(results, target)
    if value is None:
        if target in JUDGED and target not in goal.judged:
            return goal.not_applicable
        return "not measured" if target in goal.judged else DASH
    text = goal.fmt.format(value)
    if goal.passes is None or target not in goal.judged:
        return text
    return f"PASS {text}" if goal.passes(value) else f"**FAIL** {text}"


def render(results: BenchResults) -> str:
    """The targets table: one row per "Done when" line, medians of the repetitions."""
    order = ("redis", "embedded", "cluster", "direct", "bare", "litellm")
    columns = [column for column in order if column in results.targets]
    header = ["Done when", "target", *(LABELS[column] for column in columns), "context"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(columns) + ["---"]) + "|"]
    for goal in goals(results.params):
        cells = [_cell(goal, results, column) for column in columns]
        context = goal.context(results) if goal.context else ""
        lines.append("| " + " | ".join([goal.line, goal.threshold, *cells, context or DASH]) + " |")
    return "\n".join(lines)
