"""Adapter for providers that only speak Chat Completions (llama.cpp, vLLM, Ollama, LM Studio, TGI, …)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from runs.upstream.base import UpstreamFailure, UpstreamSpec
from runs.upstream.chat_request import ChatDialect, chat_request
from runs.upstream.chat_stream import ChatStreamTranslator
from runs.upstream.client import UpstreamClient


class ChatUpstream:
    """Translates the request to `/chat/completions` and the streamed chunks back into Responses events, so a
    Chat-only server gets background runs, stored responses and reattach like any Responses provider."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._client = UpstreamClient(spec)
        self._dialect = ChatDialect(
            max_tokens_field=spec.max_tokens_field,
            reasoning_effort=spec.reasoning_effort,
            send_metadata=spec.send_metadata,
        )

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Chat Completions body; raises InvalidRequest (400) for what Chat cannot express."""
        return chat_request(body, model=self.spec.upstream_model(body["model"]), dialect=self._dialect)

    async def stream_turn(
        self, body: dict[str, Any], *, api_key: str | None = None
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        translator = ChatStreamTranslator()
        # aclosing: when the run closes this turn, the connection is let go now, not when garbage is collected.
        async with contextlib.aclosing(self._client.stream_json("/chat/completions", body, api_key)) as batches:
            async for chunks in batches:
                events = [event for chunk in chunks for event in translator.feed(chunk)]
                if events:
                    yield events
        if not translator.finished:
            # A stream that just stops (a proxy's idle timeout, a crashed server) is not an answer.
            raise UpstreamFailure(
                f"upstream {self.spec.name!r} ended the stream without a finish reason.", retryable=True
            )
        yield list(translator.finish())

    async def list_models(self) -> list[str]:
        return await self._client.list_models()

    async def close(self) -> None:
        await self._client.close()
