"""Adapter for providers that only speak Chat Completions (llama.cpp, vLLM, Ollama, LM Studio, TGI, …)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from runs.upstream.base import UpstreamFailure, UpstreamSpec
from runs.upstream.chat_request import ChatDialect, chat_request
from runs.upstream.chat_stream import ChatStreamTranslator
from runs.upstream.client import make_client, provider_models, stream_json


class ChatUpstream:
    """Translates the request to `/chat/completions` and the streamed chunks back into Responses events, so a
    Chat-only server gets background runs, stored responses and reattach like any Responses provider."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._client = make_client(spec)
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
    ) -> AsyncGenerator[dict[str, Any], None]:
        translator = ChatStreamTranslator()
        async for chunk in stream_json(self._client, self.spec.name, "/chat/completions", body, api_key):
            for event in translator.feed(chunk):
                yield event
        if not translator.finished:
            # A stream that just stops (a proxy's idle timeout, a crashed server) is not an answer.
            raise UpstreamFailure(
                f"upstream {self.spec.name!r} ended the stream without a finish reason.", retryable=True
            )
        for event in translator.finish():
            yield event

    async def list_models(self) -> list[str]:
        return await provider_models(self._client, self.spec.name)

    async def close(self) -> None:
        await self._client.close()
