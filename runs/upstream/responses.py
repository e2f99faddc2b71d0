"""Adapter for providers that speak the Responses API: stream the turn with `store=false` through the openai SDK."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import openai
from openai import AsyncOpenAI, AsyncStream

from runs.upstream.base import UpstreamFailure, UpstreamSpec

# The SDK refuses to start without a key; local providers (vLLM, llama.cpp, Ollama) ignore it.
PLACEHOLDER_API_KEY = "not-needed"


class ResponsesUpstream:
    """Calls `POST {base_url}/responses` with `stream=true, store=false`; yields the raw event dicts.

    Events are taken as plain dicts (`cast_to=object`) rather than SDK models: the run only re-numbers and stores
    them, so parsing each one into a model would be wasted work on the hot path.
    """

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._client = AsyncOpenAI(
            base_url=spec.base_url,
            api_key=spec.api_key or PLACEHOLDER_API_KEY,
            max_retries=spec.max_retries,
            timeout=openai.Timeout(spec.read_timeout_seconds, connect=spec.connect_timeout_seconds),
            default_headers=spec.extra_headers or None,
        )

    async def stream_turn(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        request = {**body, "stream": True, "store": False}
        try:
            stream = await self._client.post(
                "/responses",
                body=request,
                cast_to=object,
                stream=True,
                stream_cls=AsyncStream[object],
            )
        except openai.APIStatusError as error:
            raise UpstreamFailure(_error_message(error), status=error.status_code, code=_error_code(error)) from error
        except openai.APIError as error:
            raise UpstreamFailure(f"upstream {self.spec.name!r} unreachable: {error.message}") from error
        try:
            async for event in stream:
                if isinstance(event, dict):
                    yield event
        except openai.APIError as error:
            raise UpstreamFailure(f"upstream {self.spec.name!r} broke the stream: {error.message}") from error
        finally:
            await stream.close()

    async def close(self) -> None:
        await self._client.close()


def _error_body(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def _error_message(error: openai.APIStatusError) -> str:
    message = _error_body(error).get("message")
    return message if isinstance(message, str) and message else error.message


def _error_code(error: openai.APIStatusError) -> str | None:
    code = _error_body(error).get("code")
    return code if isinstance(code, str) else None
