"""Events written to a client in the step that stored them (`follow_events`' `direct`, gateway/sse.DirectWrites):
every event reaches the client once, in order, whichever way it went, and a client the direct path cannot serve
as it is (an HTTP/1.0 client, a socket that is not keeping up) still gets every event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.sse import DirectWrites
from runs.event_log import EventLog
from runs.live import LiveEvents, LiveSubscription
from runs.subscription import follow_events
from storage.base import StoredEvent
from storage.memory import MemoryStore
from tests.conftest import Gateway
from tests.helpers import parse_frame
from tests.test_event_log import open_log


def delta(text: str) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "delta": text}  # fmt: skip


@dataclass
class Followed:
    """An embedded store with live fan-out, a response in progress with its log, and a subscription to it."""

    store: MemoryStore
    live: LiveEvents
    log: EventLog
    created: StoredEvent  # the response's stored first event, as a follower that has it knows it
    subscription: LiveSubscription

    def follow(self, direct: Callable[[Sequence[StoredEvent]], bool]) -> AsyncGenerator[list[StoredEvent] | None, None]:
        return follow_events(
            self.store,
            self.live,
            self.subscription.response_id,
            -1,
            idle_seconds=30,
            known=[self.created],
            subscription=self.subscription,
            direct=direct,
        )

    async def start_following(
        self, direct: Callable[[Sequence[StoredEvent]], bool]
    ) -> tuple[asyncio.Task[None], list[int]]:
        """A follower task, and the sequence numbers it yields (those `direct` does not take); it is waiting for
        live events when this returns."""
        yielded: list[int] = []

        async def follow() -> None:
            events = self.follow(direct)
            async with contextlib.aclosing(events):
                async for batch in events:
                    assert batch is not None
                    yielded.extend(event.sequence_number for event in batch)

        follower = asyncio.create_task(follow())
        await settle()
        return follower, yielded


async def settle() -> None:
    for _ in range(3):  # a follower has taken what it was handed and waits again
        await asyncio.sleep(0)


@pytest.fixture
async def followed() -> AsyncIterator[Followed]:
    store = MemoryStore(retention_seconds=60)
    live = LiveEvents(store.open_event_feed())
    live.start()
    log = await open_log(store, "resp_direct", publisher=live)
    created = StoredEvent(0, "response.created", b"{}", log.lease.epoch)
    yield Followed(store, live, log, created, live.subscribe("resp_direct"))
    await live.close()


async def test_the_follower_takes_each_next_event_directly_and_yields_the_rest_in_order(followed: Followed) -> None:
    log, subscription = followed.log, followed.subscription
    taken: list[int] = []
    accepting = True

    def direct(events: Sequence[StoredEvent]) -> bool:
        if accepting:
            taken.extend(event.sequence_number for event in events)
        return accepting

    follower, yielded = await followed.start_following(direct)

    async def emit(count: int) -> None:
        for index in range(count):
            await log.emit(delta(f"t{index}"))
            await log.flush()
            await settle()

    await emit(5)
    assert taken == [1, 2, 3, 4, 5]
    assert yielded == [0]
    accepting = False  # declined: they come through the follower instead
    await emit(2)
    assert yielded == [0, 6, 7]
    accepting = True  # and direct again, right after what the follower yielded
    await emit(2)
    assert taken == [1, 2, 3, 4, 5, 8, 9]
    await log.emit({"type": "response.completed", "response": {**log.snapshot, "status": "completed"}})
    await log.close()
    await asyncio.wait_for(follower, 5)
    assert yielded == [0, 6, 7, 10]  # the terminal event never goes directly: the follower ends the stream
    assert sorted(taken + yielded) == list(range(11))
    assert subscription.direct is None  # the follower ended: nothing can be taken for it any more


async def test_events_stored_together_go_in_one_direct_write_up_to_the_terminal_event(followed: Followed) -> None:
    log = followed.log
    calls: list[list[int]] = []

    def direct(events: Sequence[StoredEvent]) -> bool:
        calls.append([event.sequence_number for event in events])
        return True

    follower, yielded = await followed.start_following(direct)
    for text in ("a", "b", "c"):
        await log.emit(delta(text))
    await log.flush()  # one append, one write
    await log.emit(delta("d"))
    await log.emit({"type": "response.completed", "response": {**log.snapshot, "status": "completed"}})
    await log.close()
    await asyncio.wait_for(follower, 5)
    assert calls == [[1, 2, 3], [4]]
    assert yielded == [0, 5]


async def test_an_event_after_a_gap_is_not_taken_directly(followed: Followed) -> None:
    log, subscription = followed.log, followed.subscription
    taken: list[int] = []

    def take(events: Sequence[StoredEvent]) -> bool:
        taken.extend(event.sequence_number for event in events)
        return True

    events = followed.follow(take)
    async with contextlib.aclosing(events):
        assert [event.sequence_number for event in (await anext(events) or [])] == [0]
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        # Event 2 arrives before 1 (a hint out of order): not the next one, so it wakes the follower instead, which
        # reads the store for the gap.
        subscription.push_all([StoredEvent(2, "response.output_text.delta", b"{}", followed.created.epoch)])
        assert taken == []
        await log.emit(delta("a"))
        await log.emit(delta("b"))
        await log.flush()
        batch = await asyncio.wait_for(waiting, 5)
        assert batch is not None
        assert [event.sequence_number for event in batch] == [1, 2]


async def read_http10_stream(url: str, body: bytes) -> tuple[bytes, bytes]:
    """A streaming create sent as HTTP/1.0 over a raw socket: the headers and the whole body (until close)."""
    address = urlsplit(url)
    assert address.hostname is not None
    assert address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        request = (
            b"POST /v1/responses HTTP/1.0\r\nHost: gateway\r\nAuthorization: Bearer test-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return head, payload


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sequence numbers the gateway wrote directly (a test that passed without any would prove nothing)."""
    written: list[int] = []
    original = DirectWrites.__call__

    def counting(self: DirectWrites, events: Sequence[StoredEvent]) -> bool:
        taken = original(self, events)
        if taken:
            written.extend(event.sequence_number for event in events)
        return taken

    monkeypatch.setattr(DirectWrites, "__call__", counting)
    return written


@pytest.mark.parametrize("storage_url", ["memory", "redis"], indirect=True)
async def test_an_sdk_stream_gets_every_event_once_in_order(gateway: Gateway, direct_writes: list[int]) -> None:
    stream = await gateway.client.responses.create(
        model="sim-1", input="hello", stream=True, metadata={"sim_tokens": "40", "sim_token_delay_ms": "5"}
    )
    numbers = []
    text = ""
    async for event in stream:
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        final = event
    assert numbers == list(range(len(numbers)))
    assert final.type == "response.completed"
    assert text == final.response.output_text
    assert direct_writes  # most deltas went directly
    assert set(direct_writes) < set(numbers)


@pytest.mark.parametrize("storage_url", ["memory", "redis"], indirect=True)
async def test_an_http10_client_gets_plain_frames_with_every_event_once(
    gateway: Gateway, direct_writes: list[int]
) -> None:
    body = orjson.dumps(
        {
            "model": "sim-1",
            "input": "hello",
            "stream": True,
            "metadata": {"sim_tokens": "30", "sim_token_delay_ms": "5"},
        }
    )
    head, payload = await read_http10_stream(gateway.url, body)
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" not in head.lower()
    frames = [parse_frame(raw) for raw in payload.split(b"\n\n") if raw.strip(b"\r\n") and b"data:" in raw]
    numbers = [frame.data["sequence_number"] for frame in frames if frame.data is not None]
    assert numbers == list(range(len(numbers)))
    kinds = [frame.event for frame in frames]
    assert kinds.count("response.output_text.delta") == 30
    assert kinds[-1] == "response.completed"
    assert direct_writes  # unchunked, the frames as they are
