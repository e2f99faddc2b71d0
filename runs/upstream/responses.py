"""Adapter for providers that speak the Responses API: stream the turn with `store=false`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from runs.upstream.base import UpstreamFailure, UpstreamSpec
from runs.upstream.client import make_client, provider_models, stream_json

_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesUpstream:
    """Calls `POST {base_url}/responses` with `stream=true, store=false` and yields the provider's events: the
    gateway keeps all state itself, so the provider need not."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._client = make_client(spec)

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """The provider's request body; nothing to refuse, the provider speaks the same API."""
        return {**body, "model": self.spec.upstream_model(body["model"]), "stream": True, "store": False}

    async def stream_turn(
        self, body: dict[str, Any], *, api_key: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        async for event in stream_json(self._client, self.spec.name, "/responses", body, api_key):
            yield event
            if event.get("type") in _TERMINAL_EVENTS:
                return
        # A stream that just stops before the terminal event is a broken turn, retried if nothing was emitted.
        raise UpstreamFailure(
            f"upstream {self.spec.name!r} ended the stream before the response finished.", retryable=True
        )

    async def list_models(self) -> list[str]:
        return await provider_models(self._client, self.spec.name)

    async def close(self) -> None:
        await self._client.close()
