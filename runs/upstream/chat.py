"""Adapter for providers that only speak Chat Completions (llama.cpp, vLLM, Ollama, LM Studio, TGI, …)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from runs.token_estimate import CHARACTERS_PER_TOKEN
from runs.upstream.base import CallTrace, ProviderAnswer, TokenCount, UpstreamFailure, UpstreamSpec
from runs.upstream.chat_request import GATEWAY_NOTES, ChatDialect, chat_request
from runs.upstream.chat_stream import ChatStreamTranslator
from runs.upstream.client import UpstreamClient

log = logging.getLogger(__name__)


class ChatUpstream:
    """Translates the request to `/chat/completions` and the streamed chunks back into Responses events, so a
    Chat-only server gets background runs, stored responses and reattach like any Responses provider."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._client = UpstreamClient(spec)
        self._dropped_before: set[str] = set()
        self._tokenizer_path: str | None = None  # which of _TOKENIZER_PATHS this provider has, once found
        self._tokenizer_missing_until = 0.0  # until then, usage is estimated without asking the tokenizer
        self._dialect = ChatDialect(
            max_tokens_field=spec.max_tokens_field,
            reasoning_effort=spec.reasoning_effort,
            json_schema=spec.json_schema,
            stream_usage=spec.stream_usage,
            developer_role=spec.developer_role,
            drop_unsupported=spec.drop_unsupported,
            send_metadata=spec.send_metadata,
        )

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Chat Completions body; raises InvalidRequest (400) for what Chat cannot express (or, under
        `unsupported: drop`, leaves it out: logged once per parameter)."""
        chat = chat_request(body, model=self.spec.upstream_model(body["model"]), dialect=self._dialect)
        for param in (chat.get(GATEWAY_NOTES) or {}).get("dropped", []):
            kind = re.sub(r"\[\d+\]", "[]", param)  # once per kind of parameter, not per index
            if kind not in self._dropped_before:
                self._dropped_before.add(kind)
                log.warning("upstream %r cannot take %s: left out (unsupported: drop)", self.spec.name, kind)
        return chat

    async def stream_turn(
        self, body: dict[str, Any], *, api_key: str | None = None, call: CallTrace | None = None
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        translator = ChatStreamTranslator()
        notes = body.get(GATEWAY_NOTES) or {}
        sent = {key: value for key, value in body.items() if key != GATEWAY_NOTES}
        namespaces: dict[str, list[str]] = notes.get("namespaces") or {}
        stream = self._client.stream_json("/chat/completions", sent, api_key, call.headers if call else None)
        # aclosing: when the run closes this turn, the connection is let go now, not when garbage is collected.
        async with contextlib.aclosing(stream) as batches:
            async for chunks in batches:
                events = [event for chunk in chunks for event in translator.feed(chunk)]
                if events:
                    yield _in_namespaces(events, namespaces) if namespaces else events
        if not translator.finished:
            # A stream that just stops (a proxy's idle timeout, a crashed server) is not an answer.
            raise UpstreamFailure(
                f"upstream {self.spec.name!r} ended the stream without a finish reason.", retryable=True
            )
        final = list(translator.finish())
        terminal = final.pop() if final and isinstance(final[-1].get("response"), dict) else None
        if final:  # the items' done events go out now: counting usage must not hold them back
            yield _in_namespaces(final, namespaces) if namespaces else final
        if terminal is None:
            return
        response = terminal["response"]
        if response.get("usage") is None:
            await self._count_usage(sent, response, api_key)
        if call is not None:
            reasons = [translator.finish_reason] if translator.finish_reason else []
            call.answered(ProviderAnswer(translator.completion_id, translator.model, reasons, response.get("usage")))
        if notes.get("dropped"):
            # What the request asked for and this provider could not take: the client can see it.
            response["metadata"] = {**(response.get("metadata") or {}), "dropped": ", ".join(notes["dropped"])}
        yield _in_namespaces([terminal], namespaces) if namespaces else [terminal]

    async def count_input_tokens(self, body: dict[str, Any], *, api_key: str | None = None) -> TokenCount | None:
        """Asks the provider's tokenizer (`POST /tokenize` beside `/v1`): vLLM counts the chat messages with the
        model's chat template (`messages`); llama.cpp counts the text (`content`, the messages' text joined)."""
        chat = self.prepare(body)
        count = await self._tokenize(_prompt_request(chat), api_key)
        return None if count is None else TokenCount(count, "tokenizer")

    async def _tokenize(self, request: dict[str, Any], api_key: str | None) -> int | None:
        """How many tokens the provider's tokenizer makes of `request`: llama.cpp's and vLLM's `/tokenize`, or
        llama-cpp-python's `/extras/tokenize/count` (the first that exists, remembered); None when it has
        neither (or it failed)."""
        paths = [self._tokenizer_path] if self._tokenizer_path else list(_TOKENIZER_PATHS)
        for path in paths:
            try:
                async with asyncio.timeout(TOKENIZE_TIMEOUT_SECONDS):
                    answer = await self._client.post_json(path, request, api_key)
            except (UpstreamFailure, TimeoutError) as failure:
                # The tokenizer is an extra some servers have: one that fails leaves the count to the estimate.
                reason = failure.message if isinstance(failure, UpstreamFailure) else "timed out"
                log.warning("upstream %r could not tokenize (%s); estimating", self.spec.name, reason)
                return None
            if answer is None:
                continue
            self._tokenizer_path = path
            count, tokens = answer.get("count"), answer.get("tokens")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                return count
            if isinstance(tokens, list):
                return len(tokens)
            return None  # an endpoint of that name that is not a tokenizer: estimate instead
        return None

    async def _count_usage(self, chat: dict[str, Any], response: dict[str, Any], api_key: str | None) -> None:
        """Fill in the `usage` of a turn whose stream carried none (llama-cpp-python never sends it): counted
        by the provider's tokenizer, else the gateway's estimate; `metadata.usage` says which (the SDK's usage
        has no field for it)."""
        output_text = _output_text(response)
        prompt = completion = None
        if time.monotonic() >= self._tokenizer_missing_until:
            try:
                # One deadline for the whole count: the response's end waits for it.
                async with asyncio.timeout(TOKENIZE_TIMEOUT_SECONDS):
                    prompt = await self._tokenize(_prompt_request(chat), api_key)
                    if prompt is not None:
                        completion = await self._tokenize(_text_request(chat, output_text), api_key)
            except TimeoutError:
                log.warning("upstream %r: counting usage timed out; estimating", self.spec.name)
            if prompt is None or completion is None:
                # No tokenizer, or a busy one: later turns estimate at once for a while instead of asking again.
                self._tokenizer_missing_until = time.monotonic() + TOKENIZER_BACKOFF_SECONDS
        source = "tokenizer"
        if prompt is None or completion is None:
            source = "estimated"
            prompt = math.ceil(len(orjson.dumps(chat["messages"])) / CHARACTERS_PER_TOKEN)
            completion = math.ceil(len(output_text) / CHARACTERS_PER_TOKEN)
        response["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        response["metadata"] = {**(response.get("metadata") or {}), "usage": f"counted by the gateway ({source})"}

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


# Where servers count tokens: llama.cpp's and vLLM's `/tokenize`, llama-cpp-python's `/extras/tokenize/count`,
# all beside `/v1`.
# How long a turn's end may wait for its usage to be counted, and how long a provider whose tokenizer was missing,
# failing or too slow is not asked again.
TOKENIZE_TIMEOUT_SECONDS = 5.0
TOKENIZER_BACKOFF_SECONDS = 60.0
_TOKENIZER_PATHS = ("//tokenize", "//extras/tokenize/count")


def _prompt_request(chat: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer body for a chat request's prompt, in every server's shape: vLLM reads `messages` (applying the
    chat template), llama.cpp `content` and llama-cpp-python `input` (the messages' text joined)."""
    text = "\n".join(_message_text(message) for message in chat["messages"])
    request: dict[str, Any] = {
        "model": chat["model"],
        "messages": chat["messages"],
        "content": text,
        "input": text,
        "add_generation_prompt": True,
    }
    if chat.get("tools"):
        request["tools"] = chat["tools"]
    return request


def _text_request(chat: dict[str, Any], text: str) -> dict[str, Any]:
    """A tokenizer body for plain text: vLLM reads `prompt`, llama.cpp `content`, llama-cpp-python `input`."""
    return {"model": chat["model"], "prompt": text, "content": text, "input": text, "add_special_tokens": False}


def _output_text(response: dict[str, Any]) -> str:
    """Everything the model wrote: message text, tool call arguments, reasoning."""
    pieces: list[str] = []
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            pieces.append(f"{item.get('name', '')}{item.get('arguments', '')}")
        for part in item.get("content") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
    return "".join(pieces)


def _in_namespaces(events: list[dict[str, Any]], namespaces: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Events with calls of flattened functions (`ns__f`) named back into their namespace (`f` in `ns`)."""

    def item(value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") == "function_call" and value.get("name") in namespaces:
            namespace, name = namespaces[value["name"]]
            return {**value, "name": name, "namespace": namespace}
        return value

    mapped = []
    for event in events:
        if "item" in event:
            event = {**event, "item": item(event["item"])}
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("output"), list):
            event = {**event, "response": {**response, "output": [item(value) for value in response["output"]]}}
        mapped.append(event)
    return mapped
