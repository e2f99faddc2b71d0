"""Small helpers shared by the end-to-end tests: expected simulator text, a raw SSE reader, key inspection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from simulator import SimulatorSettings, input_text_of, simulated_text

DEFAULT_SIM_TOKENS = SimulatorSettings().tokens


def expected_text(input_value: Any, tokens: int = DEFAULT_SIM_TOKENS, instructions: str | None = None) -> str:
    """The text the simulator answers `input_value` with."""
    body: dict[str, Any] = {"input": input_value}
    if instructions is not None:
        body["instructions"] = instructions
    return "".join(simulated_text(input_text_of(body), tokens))


@dataclass
class Frame:
    """One SSE frame as received: its raw bytes and parsed fields."""

    raw: bytes
    event: str | None
    id: str | None
    data: dict[str, Any] | None
    retry_seen: bool = False

    @property
    def number(self) -> int:
        """The sequence number in the frame's `id:` (`<sequence number>.<epoch>`); -1 without one."""
        return int(self.id.partition(".")[0]) if self.id else -1


def parse_frame(raw: bytes) -> Frame:
    """Parse one frame. Lines that are not part of the event itself (the stream's `retry:` preamble, comment
    heartbeats) are dropped from `raw`, so the same event compares equal across streams."""
    raw = b"".join(line for line in raw.splitlines(keepends=True) if not line.startswith((b"retry:", b":")))
    fields: dict[str, str] = {}
    for line in raw.decode().split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value
    data = orjson.loads(fields["data"]) if "data" in fields else None
    return Frame(raw, fields.get("event"), fields.get("id"), data)


async def iter_frames(response: aiohttp.ClientResponse) -> AsyncIterator[Frame]:
    """SSE frames as they arrive, so a reader keeps what came before a broken connection. Comment-only frames are
    skipped."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            frame = parse_frame(raw + b"\n\n")
            frame.retry_seen = b"retry:" in raw
            if frame.data is not None:
                yield frame


async def read_frames(response: aiohttp.ClientResponse, limit: int | None = None) -> list[Frame]:
    """Read SSE frames until the stream ends or `limit` frames were read. Comment-only frames are skipped."""
    frames: list[Frame] = []
    async with contextlib.aclosing(iter_frames(response)) as arriving:
        async for frame in arriving:
            frames.append(frame)
            if limit is not None and len(frames) >= limit:
                break
    return frames


async def keys_with_prefix(client: aioredis.Redis | RedisCluster, prefix: str) -> list[bytes]:
    """Every key under `prefix`: on a cluster, of every master."""
    return [key async for key in client.scan_iter(match=f"{prefix}:*")]


def sdk_for(url: str) -> openai.AsyncOpenAI:
    """An SDK client for a gateway at `url` (no retries, so tests see every status)."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)


async def sim_stats(simulator_url: str) -> dict[str, Any]:
    """The simulator's counters."""
    async with aiohttp.ClientSession() as session, session.get(f"{simulator_url}/sim/stats") as reply:
        stats: dict[str, Any] = await reply.json()
        return stats


async def upstream_calls(simulator_url: str, tag: str) -> int:
    """How many model requests with this `sim_tag` reached the simulator."""
    return int((await sim_stats(simulator_url))["requests_by_tag"].get(tag, 0))


async def sim_requests(simulator_url: str, tag: str) -> list[dict[str, Any]]:
    """The bodies of the model requests with this `sim_tag` the simulator received, oldest first."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{simulator_url}/sim/requests", params={"tag": tag}) as reply,
    ):
        bodies: list[dict[str, Any]] = await reply.json()
        return bodies


async def stream_frames(url: str, response_id: str, **params: str) -> list[Frame]:
    """Every frame of `GET /v1/responses/{id}?stream=true` (plus `params`), read to the end."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/v1/responses/{response_id}", params={"stream": "true", **params}) as reply,
    ):
        assert reply.status == 200, await reply.text()
        return await read_frames(reply)
