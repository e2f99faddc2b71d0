"""The chaos test's history check: every response of the settled fleet, read back as a client would, against
what the clients saw and what the simulator was asked."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from storage.keys import KeySpace
from tests.chaos_clients import TERMINAL_EVENTS, Request
from tests.chaos_fleet import Fleet
from tests.helpers import Frame, iter_frames, sim_stats

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "incomplete"})
REPLAY_SECONDS = 10.0  # a finished response's whole log; one that is not finished is only looked at briefly
GLANCE_SECONDS = 2.0
READ_ATTEMPTS = 8
PARALLEL_READS = 16
MAX_REPORTED = 25


async def stored_response_ids(redis_url: str, key_prefix: str) -> list[str]:
    """Every response in the store, including those no client learned the id of. Only the key names are read:
    what a response holds is read through the API."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        keys = KeySpace(key_prefix)
        names = [key.decode() async for key in redis.scan_iter(match=keys.response_state_pattern(), count=1000)]
    finally:
        await redis.aclose()
    return sorted(keys.response_id_in(name) for name in names)


@dataclass
class Stored:
    """One response as the settled fleet serves it."""

    response_id: str
    snapshot: dict[str, Any] | None
    frames: list[Frame] = field(default_factory=list)
    replay_ended: bool = True
    after_terminal: list[Frame] = field(default_factory=list)
    unreadable: str | None = None

    @property
    def status(self) -> str:
        if self.snapshot is None:
            return "unreadable" if self.unreadable else "missing"
        return str(self.snapshot.get("status"))

    @property
    def tag(self) -> str | None:
        metadata = (self.snapshot or {}).get("metadata") or {}
        return metadata.get("sim_tag")


class Unreadable(Exception):
    """No gateway served a read in READ_ATTEMPTS tries."""


@dataclass
class Reader:
    """Reads through the gateways, each try on the next one; tries that failed are tallied by cause (a settled
    fleet should have none)."""

    http: aiohttp.ClientSession
    urls: list[str]
    failed_tries: Counter[str] = field(default_factory=Counter)

    def _failed(self, errors: list[str], cause: str) -> None:
        errors.append(cause)
        self.failed_tries[cause.split(" ", 1)[1][:60]] += 1

    async def snapshot(self, response_id: str, start: int = 0) -> dict[str, Any] | None:
        """GET /v1/responses/{id}; None for 404."""
        errors: list[str] = []
        for attempt in range(READ_ATTEMPTS):
            url = self.urls[(start + attempt) % len(self.urls)]
            try:
                async with self.http.get(f"{url}/v1/responses/{response_id}") as reply:
                    if reply.status == 404:
                        return None
                    if reply.status == 200:
                        snapshot: dict[str, Any] = await reply.json()
                        return snapshot
                    self._failed(errors, f"{url} HTTP {reply.status}: {(await reply.text())[:100]}")
            except (aiohttp.ClientError, TimeoutError) as error:
                self._failed(errors, f"{url} {type(error).__name__}")
            await asyncio.sleep(0.2)
        raise Unreadable(f"GET {response_id}: {errors}")

    async def replay(self, response_id: str, after: int, within: float, start: int = 0) -> tuple[list[Frame], bool]:
        """The frames of `GET ?stream=true` after `after`, and whether the stream ended by itself `within` seconds.
        A try that is refused or interrupted (an `error` event) is repeated."""
        params = {"stream": "true", **({"starting_after": str(after)} if after >= 0 else {})}
        errors: list[str] = []
        for attempt in range(READ_ATTEMPTS):
            url = self.urls[(start + attempt) % len(self.urls)]
            frames: list[Frame] = []
            try:
                async with (
                    asyncio.timeout(within),
                    self.http.get(f"{url}/v1/responses/{response_id}", params=params) as reply,
                ):
                    if reply.status != 200:
                        self._failed(errors, f"{url} HTTP {reply.status}: {(await reply.text())[:100]}")
                    else:
                        async with contextlib.aclosing(iter_frames(reply)) as arriving:
                            async for frame in arriving:  # one by one: a timeout keeps what came
                                frames.append(frame)
                        if all(frame.id is not None for frame in frames):
                            return frames, True
                        self._failed(errors, f"{url} error event: {frames[-1].data}")
            except TimeoutError:
                return frames, False
            except aiohttp.ClientError as error:
                self._failed(errors, f"{url} {type(error).__name__}")
            await asyncio.sleep(0.2)
        raise Unreadable(f"replay of {response_id} after {after}: {errors}")

    async def load(self, response_id: str, start: int = 0) -> Stored:
        """The response's snapshot and its whole event log, and whatever was stored after its terminal event."""
        try:
            snapshot = await self.snapshot(response_id, start)
            if snapshot is None:
                return Stored(response_id, None)
            within = REPLAY_SECONDS if snapshot.get("status") in TERMINAL_STATUSES else GLANCE_SECONDS
            frames, ended = await self.replay(response_id, -1, within, start)
            stored = Stored(response_id, snapshot, frames, ended)
            if ended and frames and frames[-1].event in TERMINAL_EVENTS:
                # A replay stops at the first terminal event: anything stored after it shows only from there on.
                after = max(frames[-1].number, 0)
                stored.after_terminal, _ = await self.replay(response_id, after, GLANCE_SECONDS, start)
            return stored
        except Unreadable as error:
            return Stored(response_id, None, unreadable=str(error))


@dataclass
class Report:
    summary: list[str] = field(default_factory=list)
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, check: str, text: str) -> None:
        self.violations[check].append(text)

    def render(self) -> list[str]:
        lines = []
        for check, found in sorted(self.violations.items()):
            lines.append(f"{check}: {len(found)} violation(s)")
            lines.extend(f"  - {text}" for text in found[:MAX_REPORTED])
            if len(found) > MAX_REPORTED:
                lines.append(f"  ... and {len(found) - MAX_REPORTED} more")
        return lines


def check_log(stored: Stored, report: Report, fleet: Fleet, requests: dict[str, Request]) -> None:
    """(a) terminal in the store; (b) the log is 0..n contiguous with exactly one terminal event, last."""
    rid = stored.response_id
    if stored.unreadable:
        report.add("(a) unreadable", stored.unreadable)
        return
    if stored.status not in TERMINAL_STATUSES:
        last = f"{stored.frames[-1].id}:{stored.frames[-1].event}" if stored.frames else "none"
        request = requests[stored.tag].describe() if stored.tag in requests else "no request"
        logs = fleet.logs_mentioning(rid)
        report.add("(a) non-terminal", f"{rid} status={stored.status} last stored event {last}; {request}; {logs}")
    numbers = [frame.number for frame in stored.frames]
    if numbers != list(range(len(numbers))):
        report.add("(b) stored log", f"{rid} sequence numbers are not 0..n contiguous: {numbers}")
    terminals = [frame for frame in stored.frames + stored.after_terminal if frame.event in TERMINAL_EVENTS]
    if stored.status in TERMINAL_STATUSES and (len(terminals) != 1 or stored.frames[-1:] != terminals):
        events = [f"{frame.id}:{frame.event}" for frame in stored.frames[-3:] + stored.after_terminal]
        report.add("(b) stored log", f"{rid} has {len(terminals)} terminal events, not exactly one last: {events}")
    elif stored.after_terminal:
        events = [f"{frame.id}:{frame.event}" for frame in stored.after_terminal]
        report.add("(b) stored log", f"{rid} has events after its terminal event: {events}")
    if terminals and stored.snapshot is not None:
        final_status = (terminals[0].data or {}).get("response", {}).get("status")
        if final_status != stored.status:
            report.add("(b) stored log", f"{rid} GET says {stored.status}, its terminal event says {final_status}")


def check_observed(request: Request, stored_by_id: dict[str, Stored], report: Report) -> None:
    """(b) what a client saw is the stored log, byte for byte, in order."""
    for line in request.out_of_order:
        report.add("(b) observed order", f"{line}; {request.describe()}")
    for response_id, observed in request.events.items():
        stored = stored_by_id[response_id]
        if stored.snapshot is None:
            report.add("(b) observed vs stored", f"{response_id} was streamed to a client but is {stored.status}")
            continue
        by_number = {frame.number: frame for frame in stored.frames if frame.id is not None}
        for event in observed:
            frame = by_number.get(event.sequence_number)
            if frame is None or frame.raw != event.raw:
                stored_raw = frame.raw[:200] if frame is not None else b"(no such stored event)"
                report.add(
                    "(b) observed vs stored",
                    f"{response_id} #{event.sequence_number} from {event.url}: saw {event.raw[:200]!r}, "
                    f"stored {stored_raw!r}; {request.describe()}",
                )
                break  # the first difference of a response says enough


async def check_history(fleet: Fleet, key_prefix: str, requests: list[Request], simulator_url: str) -> Report:
    """Check (a)-(d) over every stored response and every request, and (e) that every SIGTERM ended its gateway;
    the report says what was found."""
    report = Report()
    response_ids = set(await stored_response_ids(fleet.redis_url, key_prefix))
    response_ids |= {rid for request in requests for rid in request.response_ids}
    limit = asyncio.Semaphore(PARALLEL_READS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REPLAY_SECONDS * 2)) as http:
        reader = Reader(http, fleet.live_urls())

        async def load(index: int, response_id: str) -> Stored:
            async with limit:
                return await reader.load(response_id, start=index)

        loaded = await asyncio.gather(*(load(n, rid) for n, rid in enumerate(sorted(response_ids))))
    stored_by_id = {stored.response_id: stored for stored in loaded}
    requests_by_tag = {request.tag: request for request in requests}
    for stored in loaded:
        check_log(stored, report, fleet, requests_by_tag)
    for request in requests:
        check_observed(request, stored_by_id, report)

    ids_by_tag: dict[str, set[str]] = defaultdict(set)
    for stored in loaded:
        if stored.tag is not None:
            ids_by_tag[stored.tag].add(stored.response_id)
    calls: dict[str, int] = (await sim_stats(simulator_url))["requests_by_tag"]
    for request in requests:
        ids = sorted(request.response_ids | ids_by_tag[request.tag])
        if request.kind == "sync" and calls.get(request.tag, 0) > 1:
            # (c) its client got one answer (or one error); a second upstream run of the response bills twice.
            logs = [line for rid in ids for line in fleet.logs_mentioning(rid)]
            text = f"{ids} ran upstream {calls[request.tag]} times; {request.describe()}; {logs}"
            report.add("(c) synchronous re-run", text)
        if request.key is not None and len(ids) > 1:
            report.add("(d) idempotency", f"key {request.key} has responses {ids}; {request.describe()}")

    for hung in fleet.hung_shutdowns:
        report.add("(e) shutdown", hung)

    statuses = Counter(stored.status for stored in loaded)
    outcomes = Counter((request.kind, request.outcome.split(" from ")[0].split(":")[0][:40]) for request in requests)
    reruns = Counter(request.kind for request in requests if calls.get(request.tag, 0) > 1)
    report.summary = [
        f"{len(requests)} requests, {len(loaded)} responses stored: {dict(statuses)}",
        f"events seen by clients, compared byte for byte: {sum(len(e) for r in requests for e in r.events.values())}; "
        f"reattachments: {sum(request.reattached for request in requests)}",
        f"upstream calls: {sum(calls.get(r.tag, 0) for r in requests)}; requests run upstream twice+: {dict(reruns)}",
        "client outcomes: " + ", ".join(f"{kind}/{outcome}={n}" for (kind, outcome), n in sorted(outcomes.items())),
        f"replays that did not end: {sum(not stored.replay_ended for stored in loaded)}",
        f"reads of the settled fleet that failed and were tried again: {dict(reader.failed_tries)}",
    ]
    return report
