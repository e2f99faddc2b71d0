"""Token counting routes: OpenAI's ``POST /v1/responses/input_tokens`` and the ``POST /tokenize`` of vLLM and
llama.cpp. Each counts with ``token_count`` over the same flattened text as the matching generation endpoint's
usage, so a count always equals the ``input_tokens`` / ``prompt_tokens`` that generation would report.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from simulator.compaction import check_stateless_input
from simulator.plan import SIM_SETTINGS_KEY, _RequestError, json_route
from simulator.text import chat_input_text_of, input_text_of, token_count, token_ids

# What vLLM reports as the model's context length; the simulator has no limit of its own.
MAX_MODEL_LEN = 32_768

Json = dict[str, Any]


async def count_input_tokens(request: web.Request) -> web.Response:
    """``POST /v1/responses/input_tokens`` -> ``{"object": "response.input_tokens", "input_tokens": N}``."""
    return await json_route(request, _count_input_tokens)


async def _count_input_tokens(request: web.Request, body: dict[str, Any]) -> Json:
    check_stateless_input(body, ("previous_response_id", "conversation"))
    return {"object": "response.input_tokens", "input_tokens": token_count(input_text_of(body))}


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize``: vLLM's ``{"prompt": text}`` or ``{"messages": [...]}`` -> ``{"count", "max_model_len",
    "tokens"}``; llama.cpp's ``{"content": text}`` -> ``{"tokens"}`` (llama.cpp returns only those)."""
    return await json_route(request, _tokenize)


async def count_tokens_llama_cpp_python(request: web.Request) -> web.Response:
    """``POST /extras/tokenize/count`` as llama-cpp-python serves it: ``{"input": text}`` -> ``{"count"}``."""
    return await json_route(request, _llama_cpp_python_count)


async def _llama_cpp_python_count(request: web.Request, body: dict[str, Any]) -> Json:
    if not isinstance(body.get("input"), str):
        raise _RequestError(400, "input must be a string", param="input")
    return {"count": len(token_ids(body["input"]))}


async def _tokenize(request: web.Request, body: dict[str, Any]) -> Json:
    if request.app[SIM_SETTINGS_KEY].chat_dialect == "llama-cpp-python":
        raise _RequestError(404, "Not Found")  # that server counts at /extras/tokenize/count instead
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise _RequestError(400, "messages must be a non-empty array", param="messages")
        return _vllm(chat_input_text_of(body))
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise _RequestError(400, "prompt must be a string", param="prompt")
        return _vllm(body["prompt"])
    if "content" in body:
        if not isinstance(body["content"], str):
            raise _RequestError(400, "content must be a string", param="content")
        return {"tokens": token_ids(body["content"])}
    raise _RequestError(400, "One of prompt, messages (vLLM) or content (llama.cpp) is required.", param="prompt")


def _vllm(text: str) -> Json:
    tokens = token_ids(text)
    return {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}
