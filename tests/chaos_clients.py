"""The chaos test's workload: clients that create responses of every kind on whichever gateway is up, record
every SSE event they see, byte for byte, and reattach elsewhere when a connection is lost."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

from tests.chaos_fleet import Fleet
from tests.helpers import iter_frames, sdk_for

TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})

# kind: (weight, background, stream, keyed)
KINDS: dict[str, tuple[float, bool, bool, bool]] = {
    "background_stream": (0.35, True, True, False),
    "stream": (0.20, False, True, False),
    "sync": (0.30, False, False, False),
    "keyed_background_stream": (0.075, True, True, True),
    "keyed_sync": (0.075, False, False, True),
}
CANCEL_SHARE = 0.25  # of background streams
TOKENS = (10, 40)
TOKEN_DELAY_MS = (30, 90)
TTFT_MS = (50, 1000)  # a long wait for the first token leaves crashed runs with no output: they restart
LONGEST_RUN_SECONDS = (TOKENS[1] * TOKEN_DELAY_MS[1] + TTFT_MS[1]) / 1000
STREAM_STALL_SECONDS = 4.0  # gateways send heartbeats every second: silence this long means a paused instance
CONNECT_SECONDS = 2.0
RETRY_PAUSE_SECONDS = (0.1, 0.6)


@dataclass
class Observed:
    """One SSE event as a client received it."""

    sequence_number: int
    event: str
    raw: bytes
    url: str


@dataclass
class Request:
    """One client request and everything its client saw; a client's retry of an unkeyed request is another one."""

    number: int
    kind: str
    tag: str
    key: str | None
    cancel: bool
    response_ids: set[str] = field(default_factory=set)
    events: dict[str, list[Observed]] = field(default_factory=dict)
    out_of_order: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    saw_terminal: bool = False
    reattached: int = 0
    outcome: str = "running"
    cancelling: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def background(self) -> bool:
        return KINDS[self.kind][1]

    @property
    def stream(self) -> bool:
        return KINDS[self.kind][2]

    def note(self, text: str) -> None:
        self.notes.append(text[:300])

    def as_json(self) -> dict[str, Any]:
        """Everything but the raw events, for the post-mortem file."""
        return {
            "number": self.number,
            "kind": self.kind,
            "tag": self.tag,
            "key": self.key,
            "cancel": self.cancel,
            "response_ids": sorted(self.response_ids),
            "events": {rid: [(e.sequence_number, e.event, e.url) for e in seen] for rid, seen in self.events.items()},
            "out_of_order": self.out_of_order,
            "reattached": self.reattached,
            "notes": self.notes,
            "outcome": self.outcome,
        }

    def describe(self) -> str:
        key = f" key={self.key}" if self.key else ""
        notes = "; ".join(self.notes[-6:])
        return f"request #{self.number} {self.kind} tag={self.tag}{key} outcome={self.outcome} notes=[{notes}]"


@dataclass
class Workload:
    """Clients running requests against the fleet until `stop_at`; none waits past `give_up_at`."""

    fleet: Fleet
    rng: random.Random
    run_id: str
    stop_at: float = 0.0
    give_up_at: float = 0.0
    requests: list[Request] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    _http: aiohttp.ClientSession | None = None
    _sdks: dict[str, openai.AsyncOpenAI] = field(default_factory=dict)

    async def __aenter__(self) -> Workload:
        # No keep-alive: a pooled connection to a gateway that was killed since would fail the next request.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))
        self._sdks = {gateway.url: sdk_for(gateway.url) for gateway in self.fleet.gateways}
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._http is not None
        await self._http.close()
        for sdk in self._sdks.values():
            await sdk.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    def pick(self, avoid: str | None = None) -> str:
        """A gateway that is up, another than `avoid` when there is one; any gateway when none is up."""
        urls = self.fleet.live_urls() or [gateway.url for gateway in self.fleet.gateways]
        others = [url for url in urls if url != avoid]
        return self.rng.choice(others or urls)

    def _note(self, request: Request, text: str) -> None:
        request.note(f"t={time.monotonic() - self.fleet.started_at:.1f}s {text}")

    def left(self) -> float:
        return self.give_up_at - time.monotonic()

    async def pause(self) -> None:
        await asyncio.sleep(self.rng.uniform(*RETRY_PAUSE_SECONDS))

    async def client(self) -> None:
        while time.monotonic() < self.stop_at:
            number = next(self._numbers)
            kind = self.rng.choices(list(KINDS), [spec[0] for spec in KINDS.values()])[0]
            tag = f"{self.run_id}-{number}"
            key = f"chaos-{tag}" if KINDS[kind][3] else None
            request = Request(number, kind, tag, key, cancel=KINDS[kind][1] and self.rng.random() < CANCEL_SHARE)
            self.requests.append(request)
            try:
                if request.stream:
                    await self._streamed(request)
                else:
                    await self._synchronous(request)
            except asyncio.CancelledError:
                request.outcome = "client still waiting at the deadline"
                raise

    def _body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "sim-1",
            "input": f"chaos {request.tag}",
            "metadata": {
                "sim_tag": request.tag,
                "sim_tokens": str(self.rng.randint(*TOKENS)),
                "sim_token_delay_ms": str(self.rng.randint(*TOKEN_DELAY_MS)),
                "sim_ttft_ms": str(self.rng.randint(*TTFT_MS)),
            },
        }
        if request.background:
            body["background"] = True
        if request.stream:
            body["stream"] = True
        return body

    async def _synchronous(self, request: Request) -> None:
        """A non-streaming, non-background create. Unkeyed: one try. Keyed: the same request again (same key,
        same body) until it answers."""
        body = self._body(request)
        headers = {"Idempotency-Key": request.key} if request.key else None
        url = None
        while self.left() > 0:
            url = self.pick(avoid=url)
            try:
                response = await self._sdks[url].responses.create(
                    **body, extra_headers=headers, timeout=max(self.left(), 1.0)
                )
            except openai.APIStatusError as error:
                request.outcome = f"HTTP {error.status_code} from {url}: {error.message[:120]}"
            except openai.APIError as error:
                request.outcome = f"{type(error).__name__} from {url}"
            else:
                request.response_ids.add(response.id)
                request.outcome = f"{response.status} from {url}"
                return
            self._note(request, request.outcome)
            if request.key is None:
                return
            await self.pause()

    async def _streamed(self, request: Request) -> None:
        """A streaming create, followed to its terminal event across instances."""
        body = self._body(request)
        headers = {"Idempotency-Key": request.key} if request.key else {}
        response_id = None
        cursor = -1
        url = None
        try:
            while self.left() > 0 and not request.saw_terminal:
                url = self.pick(avoid=url)
                try:
                    if response_id is None:
                        reply_context = self.http.post(
                            f"{url}/v1/responses", json=body, headers=headers, timeout=self._stream_timeout()
                        )
                    else:
                        request.reattached += 1
                        params = {"stream": "true"}
                        if cursor >= 0:
                            params["starting_after"] = str(cursor)
                        reply_context = self.http.get(
                            f"{url}/v1/responses/{response_id}", params=params, timeout=self._stream_timeout()
                        )
                    async with reply_context as reply:
                        if reply.status != 200:
                            request.outcome = f"HTTP {reply.status} from {url}: {(await reply.text())[:120]}"
                            self._note(request, request.outcome)
                        else:
                            response_id, cursor = await self._read(request, reply, url, response_id, cursor)
                except (aiohttp.ClientError, TimeoutError) as error:
                    self._note(request, f"{type(error).__name__} from {url} after {cursor}")
                if response_id is None and request.key is None:
                    if not request.outcome.startswith("HTTP"):
                        request.outcome = "lost before the response id was known"
                    return  # refused, or nothing to reattach to (the store check still covers the response)
                if not request.saw_terminal:
                    await self.pause()
            request.outcome = "terminal event seen" if request.saw_terminal else "gave up at the deadline"
        finally:
            if request.cancelling is not None:  # its answer is worth a note, but no wait past the deadline
                await asyncio.wait({request.cancelling}, timeout=max(self.left(), 0.0))
                request.cancelling.cancel()

    def _stream_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=max(self.left(), 1.0), sock_connect=CONNECT_SECONDS, sock_read=STREAM_STALL_SECONDS
        )

    async def _read(
        self, request: Request, reply: aiohttp.ClientResponse, url: str, response_id: str | None, cursor: int
    ) -> tuple[str | None, int]:
        """Record frames as they arrive, so what came before a broken connection is kept."""
        async with contextlib.aclosing(iter_frames(reply)) as arriving:
            async for frame in arriving:
                if frame.id is None:  # the `error` event of a stream that broke: reattach
                    self._note(request, f"error event from {url}: {(frame.data or {}).get('message')}")
                    continue
                sequence_number = frame.number
                if response_id is None:
                    response_id = frame.data["response"]["id"]  # response.created comes first
                    request.response_ids.add(response_id)
                    if request.cancel and request.cancelling is None:
                        request.cancelling = asyncio.create_task(self._cancel_later(request, response_id))
                    cursor = -1  # a keyed retry replays from the start
                if sequence_number != cursor + 1:
                    request.out_of_order.append(f"{url} sent {sequence_number} after {cursor} ({response_id})")
                observed = Observed(sequence_number, frame.event or "", frame.raw, url)
                request.events.setdefault(response_id, []).append(observed)
                cursor = max(cursor, sequence_number)
                if frame.event in TERMINAL_EVENTS:
                    request.saw_terminal = True
                    return response_id, cursor
        self._note(request, f"stream from {url} ended after {cursor} without a terminal event")
        return response_id, cursor

    async def _cancel_later(self, request: Request, response_id: str) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 2.5))
        url = None
        for _ in range(3):
            url = self.pick(avoid=url)
            try:
                cancelled = await self._sdks[url].responses.cancel(response_id, timeout=15)
            except openai.BadRequestError:
                self._note(request, f"cancel on {url}: already finished")
                return
            except openai.APIError as error:
                self._note(request, f"cancel on {url}: {type(error).__name__}")
                await self.pause()
            else:
                self._note(request, f"cancel on {url}: {cancelled.status}")
                return
