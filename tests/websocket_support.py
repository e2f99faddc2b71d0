"""What the WebSocket and steering tests share: gateway settings with a tagged simulator, pace knobs, and reading a
socket to the end of its responses."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.config import load_settings

TERMINAL = ("response.completed", "response.incomplete", "response.failed", "response.cancelled")


def settings_for(storage_url: str, simulator_url: str, key_prefix: str, kind: str = "responses", **extra: Any) -> Any:
    """Every provider call is tagged with the test's key prefix; a Chat upstream (which does not pass `metadata`
    on) gets the simulator's pace as headers too."""
    headers = {"x-sim-tag": key_prefix}
    if kind == "chat":
        headers |= {"x-sim-tokens": "40", "x-sim-token-delay-ms": "15", "x-sim-ttft-ms": "400"}
    upstream = {"name": "sim", "kind": kind, "base_url": f"{simulator_url}/v1", "max_retries": 0, "headers": headers}
    return load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix, "retention_seconds": 600},
        upstreams=[upstream],
        runs={"lease_seconds": 2.0, "renew_seconds": 0.5, "sweep_seconds": 0.2, **extra.pop("runs", {})},
        **extra,
    )


def knobs(tag: str, *, tokens: int = 6, delay_ms: int = 5) -> dict[str, str]:
    return {"sim_tag": tag, "sim_tokens": str(tokens), "sim_token_delay_ms": str(delay_ms)}


async def until_terminal(connection: Any, responses: int = 1) -> list[Any]:
    """Events received until `responses` terminal events (or an error) have arrived."""
    events = []
    ended = 0
    async with asyncio.timeout(20):
        async for event in connection:
            events.append(event)
            if event.type in TERMINAL:
                ended += 1
                if ended == responses:
                    return events
            if event.type == "error":
                return events
    return events
