"""The simulator's ``POST /v1/chat/completions``: the same deterministic answers and knobs as ``/v1/responses``
(see ``simulator.server``), spoken in the Chat Completions wire format, for testing providers that only have it.

The text is ``simulated_text(chat_input_text_of(body), tokens)``, which equals the Responses answer to the
same conversation. A stream is ``data: <chat.completion.chunk>`` frames (no ``event:`` lines, as OpenAI sends
them): an opening ``{"role": "assistant", "content": ""}`` delta, one ``content`` delta per token, a final
chunk with an empty delta and ``finish_reason``, then (if ``stream_options.include_usage``; other chunks then
carry ``"usage": null``) a chunk with no choices and the usage, and ``data: [DONE]``. ``max_completion_tokens``
(or else ``max_tokens``) below the token count cuts the text there and finishes with ``"length"``.

How the shared knobs read here: ``sim_ttft_ms`` delays the first chunk after the opening one; ``sim_fault``
``hang`` sends the opening chunk then nothing; ``error_event`` sends ``data: {"error": {...}}`` after the first
content (or tool call) chunk and ends without ``[DONE]`` (a non-streaming request gets a 500 error envelope,
as chat has no failed-completion object); ``sim_fail_after`` counts frames (the opening chunk is the 1st).

Tools and ``response_format`` work as ``simulator.answers`` describes (the Responses rules, in Chat's spelling):
with function ``tools`` and no call in the messages yet, the answer is one call streamed as the knob below
streams it; a ``json_schema`` or ``json_object`` format makes the content JSON, in pieces of a few characters.

Chat-only knobs (whole numbers, 0 = none; the Responses endpoint ignores them):

``sim_reasoning``
    ``R``: before the answer, R tokens of ``simulated_reasoning`` as ``reasoning_content`` deltas, as DeepSeek,
    vLLM and llama.cpp stream them (a non-streaming message carries ``reasoning_content``). They count in
    ``completion_tokens`` and ``completion_tokens_details.reasoning_tokens``.
``sim_tool_calls``
    ``N``: answer with N function calls instead of text (needs function ``tools``; call i uses tool
    ``i % len(tools)``, its arguments ``simulated_tool_arguments(input_text, i)``), finishing ``"tool_calls"``.
    Without reasoning before it, the first call's chunk opens the message (``role``, ``content: null``) in
    place of the usual opening chunk. Each call streams its id and name first, then its arguments in
    pieces of a few characters (each piece counts as a completion token). The token cap does not apply.
    When given, it overrides the tools default above: ``0`` answers in text even with tools.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from simulator.answers import (
    Answer,
    ToolCall,
    chat_called_before,
    chat_format,
    chat_tool_choice,
    chat_tools,
    decide,
    new_call_id,
    text_answer,
)
from simulator.plan import (
    FAILURE_MESSAGE,
    FAULT_ERROR_EVENT,
    FAULT_HANG,
    SIM_SETTINGS_KEY,
    _json,
    _knob,
    _metadata,
    _number,
    _Plan,
    _plan,
    _RequestError,
)
from simulator.server import SIM_MODEL_ID, Event, _serve
from simulator.text import VOCABULARY, chat_input_text_of, simulated_text, token_count

_DONE_FRAME = b"data: [DONE]\n\n"
_ERROR_CHUNK: Event = {"error": {"message": FAILURE_MESSAGE, "type": "server_error", "code": "server_error"}}

# When a chunk goes out: "opening" at once, the first other chunk after the time to first token, further
# "output" chunks (tokens, argument pieces) a token delay apart, "closing" ones (finish, usage, error) at once.
_Pace = Literal["opening", "output", "closing"]


def simulated_reasoning(input_text: str, tokens: int) -> list[str]:
    """The deterministic reasoning tokens streamed before the answer to ``input_text``."""
    # A different seed than the answer's, so reasoning and answer text are told apart in tests.
    return simulated_text("reasoning\n" + input_text, tokens)


def simulated_tool_arguments(input_text: str, index: int) -> str:
    """The JSON arguments of the ``index``-th simulated call answering ``input_text``."""
    digest = hashlib.sha256(f"call {index}\n{input_text}".encode()).digest()
    word = VOCABULARY[int.from_bytes(digest, "big") % len(VOCABULARY)]
    return json.dumps({"city": word, "n": index})


@dataclass(slots=True)
class _SimulatedChat:
    """One chat completion being generated, everything it will say decided up front."""

    plan: _Plan
    model: str
    include_usage: bool
    prompt_tokens: int
    reasoning: list[str]
    content: list[str]  # empty when answering with tool calls
    truncated: bool  # the token cap cut the content short
    calls: list[ToolCall]
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def finish_reason(self) -> str:
        if self.calls:
            return "tool_calls"
        return "length" if self.truncated else "stop"

    def usage(self) -> Event:
        completion_tokens = len(self.reasoning) + len(self.content) + sum(len(call.pieces()) for call in self.calls)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": len(self.reasoning)},
        }

    def _head(self, kind: str) -> Event:
        return {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: Event, finish_reason: str | None = None) -> Event:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _chunks(self) -> Iterator[tuple[_Pace, Event]]:
        failing = self.plan.fault == FAULT_ERROR_EVENT
        if self.reasoning or not self.calls:
            yield "opening", self._chunk({"role": "assistant", "content": ""})
        for token in self.reasoning:
            yield "output", self._chunk({"reasoning_content": token})
        for index, call in enumerate(self.calls):
            function = {"name": call.name, "arguments": ""}
            opening = {"index": index, "id": call.call_id, "type": "function", "function": function}
            role = {} if index or self.reasoning else {"role": "assistant", "content": None}
            yield "output", self._chunk({**role, "tool_calls": [opening]})
            if failing:
                yield "closing", _ERROR_CHUNK
                return
            for piece in call.pieces():
                yield "output", self._chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        for token in self.content:
            yield "output", self._chunk({"content": token})
            if failing:
                yield "closing", _ERROR_CHUNK
                return
        if failing:  # no content to fail after (sim_tokens 0): fail at once
            yield "closing", _ERROR_CHUNK
            return
        yield "closing", self._chunk({}, self.finish_reason)
        if self.include_usage:
            yield "closing", {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage()}

    def frames(self) -> Iterator[tuple[float, bytes]]:
        plan = self.plan
        # A hang is a time to first token that never ends; the server's _wait notices the client leaving.
        first_s = math.inf if plan.fault == FAULT_HANG else plan.ttft_s
        waited = False
        for pace, chunk in self._chunks():
            delay_s = 0.0
            if pace != "opening" and not waited:
                delay_s, waited = first_s, True
            elif pace == "output":
                delay_s = plan.token_delay_s
            yield delay_s, b"data: " + orjson.dumps(chunk) + b"\n\n"
        # A stream broken by an error event just stops, as providers' do: [DONE] would claim it finished.
        if plan.fault != FAULT_ERROR_EVENT:
            yield 0.0, _DONE_FRAME

    def respond(self) -> web.Response:
        if self.plan.fault == FAULT_ERROR_EVENT:
            # Chat has no failed-completion object, so a generation breaking off answers as a provider error.
            return _RequestError(500, FAILURE_MESSAGE, code="server_error").response()
        message: Event = {
            "role": "assistant",
            "content": None if self.calls else "".join(self.content),
            "refusal": None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in self.calls
            ]
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}
        return _json({**self._head("chat.completion"), "choices": [choice], "usage": self.usage()})


def _count(request: web.Request, metadata: Mapping[str, Any], name: str) -> int:
    """A whole-number chat knob, 0 when absent."""
    value = _number(request, metadata, name, 0.0)
    if not value.is_integer():
        raise _RequestError(400, f"{name} must be a whole number, got {value}", param=f"metadata.{name}")
    return int(value)


def _prepare(request: web.Request, body: dict[str, Any]) -> _SimulatedChat:
    # max_tokens is the deprecated spelling; servers such as vLLM prefer max_completion_tokens when both come.
    cap_fields = ("max_completion_tokens", "max_tokens")
    plan = _plan(request, body, request.app[SIM_SETTINGS_KEY], cap_fields=cap_fields)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError(400, "messages must be a non-empty array", param="messages")
    metadata = _metadata(body)
    reasoning_count = _count(request, metadata, "sim_reasoning")
    tools = chat_tools(body)
    input_text = chat_input_text_of(body)
    settings = request.app[SIM_SETTINGS_KEY]
    output_format = chat_format(body, settings.chat_dialect)
    if _knob(request, metadata, "sim_tool_calls") is not None:
        # The knob decides outright: N calls, or (0) text whatever the tools.
        call_count = _count(request, metadata, "sim_tool_calls")
        if call_count and not tools:
            raise _RequestError(400, "sim_tool_calls needs function tools in the request", param="tools")
        calls = [
            ToolCall(new_call_id(), tools[index % len(tools)].name, simulated_tool_arguments(input_text, index))
            for index in range(call_count)
        ]
        answer = Answer(text=[]) if calls else text_answer(input_text, plan.tokens, plan.cap, output_format)
    else:
        answer = decide(
            input_text=input_text,
            tokens=plan.tokens,
            cap=plan.cap,
            tools=tools,
            choice=chat_tool_choice(body),
            called_before=chat_called_before(body),
            output_format=output_format,
        )
        calls = [answer.call] if answer.call is not None else []
    stream_options = body.get("stream_options")
    include_usage = (
        bool(body.get("stream"))
        and isinstance(stream_options, Mapping)
        and bool(stream_options.get("include_usage"))
        and settings.chat_dialect != "llama-cpp-python"  # it streams no usage, asked or not
    )
    return _SimulatedChat(
        plan=plan,
        model=str(body.get("model") or SIM_MODEL_ID),
        include_usage=include_usage,
        prompt_tokens=token_count(input_text),
        reasoning=simulated_reasoning(input_text, reasoning_count),
        content=answer.text,
        truncated=answer.truncated,
        calls=calls,
    )


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``; registered by ``simulator.server.create_simulator_app``."""
    return await _serve(request, _prepare)
