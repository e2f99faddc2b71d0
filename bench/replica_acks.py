"""(f) What waiting for a replica costs: `storage.replica_acks: 1` on the Redis Cluster, beside the same cluster
without it.

With it, a response's terminal event is published only once a replica has it (WAIT 1 on the master of its slot),
so a completed response a client has seen survives the failover of that master. The price is paid once per
response, at its end: measured here as the latency of short synchronous (non-streaming) creates, one at a time
and `CONCURRENT` at once, on two gateways that differ only in that setting, in interleaved repetitions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson

from bench.stats import median, percentile
from bench.workloads import MODEL, Knobs, Target, http_session, request_headers

# A short answer at full speed: what is measured is the gateway's work around it, the WAIT included.
KNOBS = Knobs(tokens=8, token_delay_ms=0, ttft_ms=0)
CONCURRENT = 16
LEVELS = (1, CONCURRENT)


@dataclass
class AckLatency:
    """Request latencies (ms) per target name and level (requests in flight), one list per repetition."""

    requests: int
    runs: dict[tuple[str, int], list[list[float]]] = field(default_factory=dict)
    errors: int = 0

    def p(self, target: str, level: int, q: float) -> float | None:
        """Median over repetitions of the q-th percentile."""
        return median(percentile(run, q) for run in self.runs.get((target, level), []))


async def _latencies(target: Target, requests: int, in_flight: int, limit_s: float) -> tuple[list[float], int]:
    body = orjson.dumps({"model": MODEL, "input": "replica acks", "metadata": KNOBS.metadata()})
    headers = request_headers(target, KNOBS)
    latencies: list[float] = []
    errors = 0
    left = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for _ in left:
            started = time.perf_counter()
            async with http.post(f"{target.base_url}/responses", data=body, headers=headers) as reply:
                payload = await reply.read()
            if reply.status != 200 or orjson.loads(payload).get("status") != "completed":
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    async with http_session(limit_s) as http:
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, errors


async def measure(targets: list[Target], *, requests: int, repetitions: int, limit_s: float) -> AckLatency:
    """Each level, each repetition, each target in turn (so drift on the machine hits them alike)."""
    found = AckLatency(requests=requests)
    deadline = time.monotonic() + limit_s
    for level in LEVELS:
        for _ in range(repetitions):
            for target in targets:
                left = deadline - time.monotonic()
                if left <= 0:
                    return found
                latencies, errors = await _latencies(target, requests, level, left)
                found.runs.setdefault((target.name, level), []).append(latencies)
                found.errors += errors
    return found


def render(found: AckLatency, labels: dict[str, str]) -> list[str]:
    """The section of the report: p50/p99 per target and level, and what the wait adds."""
    names = list(dict.fromkeys(name for name, _ in found.runs))
    lines = [
        "## Replica acknowledgement of terminal events (f)",
        "",
        f"Latency of a short synchronous create ({KNOBS.tokens} tokens at full speed), {found.requests} requests per "
        "repetition, medians over repetitions; `storage.replica_acks: 1` makes the gateway WAIT for one replica of "
        "the slot's master before it publishes the terminal event (see README, Redis Cluster).",
        "",
        "| requests in flight | "
        + " | ".join(f"{labels.get(n, n)} p50 / p99 (ms)" for n in names)
        + " | added p50 / p99 (ms) |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for level in LEVELS:
        cells = []
        values = []
        for name in names:
            p50, p99 = found.p(name, level, 50), found.p(name, level, 99)
            values.append((p50, p99))
            cells.append("—" if p50 is None or p99 is None else f"{p50:.2f} / {p99:.2f}")
        added = "—"
        if len(values) == 2 and None not in (*values[0], *values[1]):
            (base50, base99), (acks50, acks99) = values
            added = f"{acks50 - base50:+.2f} / {acks99 - base99:+.2f}"  # type: ignore[operator]
        lines.append(f"| {level} | " + " | ".join(cells) + f" | {added} |")
    if found.errors:
        lines.append(f"\n{found.errors} requests failed and are not counted.")
    return [*lines, ""]
