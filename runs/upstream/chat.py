"""Adapter for providers that only speak Chat Completions (llama.cpp, vLLM, Ollama, LM Studio, TGI, …)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from runs.upstream.base import TokenCount, UpstreamFailure, UpstreamSpec
from runs.upstream.chat_request import ChatDialect, chat_request
from runs.upstream.chat_stream import ChatStreamTranslator
from runs.upstream.client import UpstreamClient

log = logging.getLogger(__name__)


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

    async def count_input_tokens(self, body: dict[str, Any], *, api_key: str | None = None) -> TokenCount | None:
        """Asks the provider's tokenizer (`POST /tokenize` beside `/v1`): vLLM counts the chat messages with the
        model's chat template (`messages`); llama.cpp counts the text (`content`, the messages' text joined)."""
        chat = self.prepare(body)
        request: dict[str, Any] = {
            "model": chat["model"],
            "messages": chat["messages"],
            "content": "\n".join(_message_text(message) for message in chat["messages"]),
            "add_generation_prompt": True,
        }
        if chat.get("tools"):
            request["tools"] = chat["tools"]
        try:
            answer = await self._client.post_json("//tokenize", request, api_key)
        except UpstreamFailure as failure:
            # The tokenizer is an extra some servers have: one that fails leaves the count to the estimate.
            log.warning("upstream %r could not tokenize (%s); estimating the count", self.spec.name, failure.message)
            return None
        if answer is None:
            return None
        count, tokens = answer.get("count"), answer.get("tokens")
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return TokenCount(count, "tokenizer")
        if isinstance(tokens, list):
            return TokenCount(len(tokens), "tokenizer")
        return None  # an endpoint of that name that is not a tokenizer: estimate instead

    async def compact(self, body: dict[str, Any], *, api_key: str | None = None) -> dict[str, Any] | None:
        return None  # Chat Completions has no compaction: the gateway summarises with the model itself

    async def list_models(self) -> list[str]:
        return await self._client.list_models()

    async def close(self) -> None:
        await self._client.close()


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
