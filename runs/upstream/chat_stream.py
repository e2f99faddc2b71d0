"""Turn a streamed Chat Completions answer into the exact Responses event sequence the SDK expects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runs.ids import new_item_id

Event = dict[str, Any]

# Chat finish reasons that end a response early, with the Responses `incomplete_details.reason` for each.
_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _logprobs(chat_logprobs: Any) -> list[dict[str, Any]]:
    """Chat's `choices[].logprobs.content` in the Responses shape."""
    if not isinstance(chat_logprobs, dict):
        return []
    converted = []
    for entry in chat_logprobs.get("content") or []:
        converted.append(
            {
                "token": entry.get("token", ""),
                "logprob": entry.get("logprob", 0.0),
                "bytes": entry.get("bytes") or [],
                "top_logprobs": [
                    {"token": top.get("token", ""), "logprob": top.get("logprob", 0.0), "bytes": top.get("bytes") or []}
                    for top in entry.get("top_logprobs") or []
                ],
            }
        )
    return converted


def _without_bytes(logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logprobs as the text delta and done events carry them: OpenAI's events have no `bytes`; only the output
    text part does."""
    return [
        {
            "token": entry["token"],
            "logprob": entry["logprob"],
            "top_logprobs": [{"token": top["token"], "logprob": top["logprob"]} for top in entry["top_logprobs"]],
        }
        for entry in logprobs
    ]


def _usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion),
    }


@dataclass(slots=True)
class _OpenItem:
    """An output item whose events are still coming."""

    output_index: int
    item: dict[str, Any]
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class ChatStreamTranslator:
    """Feed it Chat chunks in order; it returns the Responses events each one produces, and `finish` returns the
    closing events and the terminal `response.*` event (with output, usage, status) for the run to complete."""

    items: list[dict[str, Any]] = field(default_factory=list)  # finished output items, in output order
    _reasoning: _OpenItem | None = None
    _message: _OpenItem | None = None
    _calls: dict[int, _OpenItem] = field(default_factory=dict)  # by the chunk's tool_call index
    _next_output_index: int = 0
    _finish_reason: str | None = None
    _usage: dict[str, Any] | None = None
    # The provider's completion id and model, as its finishing chunk names them (for the call's trace).
    completion_id: str | None = None
    model: str | None = None

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1 is not a Responses concept; only the first choice is the answer
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                events += self._reasoning_delta(reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                events += self._text_delta(content, _logprobs(choice.get("logprobs")))
            for call in delta.get("tool_calls") or []:
                events += self._tool_call_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                self.completion_id, self.model = chunk.get("id"), chunk.get("model")
        return events

    @property
    def finished(self) -> bool:
        """Whether the provider said why it stopped (a finish reason), i.e. the answer is whole."""
        return self._finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        """Why the provider stopped, in its own words (`stop`, `length`, `tool_calls`, …)."""
        return self._finish_reason

    def finish(self) -> list[Event]:
        events = self._close_reasoning() + self._close_message() + self._close_calls()
        incomplete = _INCOMPLETE_REASONS.get(self._finish_reason or "")
        kind = "response.incomplete" if incomplete else "response.completed"
        response = {
            "status": "incomplete" if incomplete else "completed",
            "output": self.items,
            "usage": _usage(self._usage),
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "error": None,
        }
        events.append({"type": kind, "response": response})
        return events

    def _open(self, item: dict[str, Any]) -> tuple[_OpenItem, Event]:
        opened = _OpenItem(self._next_output_index, item)
        self._next_output_index += 1
        return opened, {"type": "response.output_item.added", "output_index": opened.output_index, "item": dict(item)}

    def _finished(self, opened: _OpenItem, item: dict[str, Any]) -> Event:
        self.items.append(item)
        return {"type": "response.output_item.done", "output_index": opened.output_index, "item": item}

    # Reasoning (DeepSeek-style `reasoning_content`, as vLLM, llama.cpp and others stream it).

    def _reasoning_delta(self, delta: str) -> list[Event]:
        events: list[Event] = []
        if self._reasoning is None:
            events += self._close_message() + self._close_calls()
            item = {"id": new_item_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            self._reasoning, added = self._open(item)
            part_added = {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": self._reasoning.output_index,
                "content_index": 0,
                "part": {"type": "reasoning_text", "text": ""},
            }
            events += [added, part_added]
        self._reasoning.text += delta
        events.append(
            {
                "type": "response.reasoning_text.delta",
                "item_id": self._reasoning.item["id"],
                "output_index": self._reasoning.output_index,
                "content_index": 0,
                "delta": delta,
            }
        )
        return events

    def _close_reasoning(self) -> list[Event]:
        opened, self._reasoning = self._reasoning, None
        if opened is None:
            return []
        where = {"item_id": opened.item["id"], "output_index": opened.output_index, "content_index": 0}
        part = {"type": "reasoning_text", "text": opened.text}
        item = {**opened.item, "content": [part], "status": "completed"}
        return [
            {"type": "response.reasoning_text.done", **where, "text": opened.text},
            {"type": "response.content_part.done", **where, "part": part},
            self._finished(opened, item),
        ]

    # The assistant's text.

    def _text_delta(self, delta: str, logprobs: list[dict[str, Any]]) -> list[Event]:
        events: list[Event] = []
        if self._message is None:
            events += self._close_reasoning() + self._close_calls()
            item = {
                "id": new_item_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._message, added = self._open(item)
            part_added = {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": self._message.output_index,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            }
            events += [added, part_added]
        self._message.text += delta
        self._message.logprobs += logprobs
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": self._message.item["id"],
                "output_index": self._message.output_index,
                "content_index": 0,
                "delta": delta,
                "logprobs": _without_bytes(logprobs),
            }
        )
        return events

    def _close_message(self) -> list[Event]:
        opened, self._message = self._message, None
        if opened is None:
            return []
        where = {"item_id": opened.item["id"], "output_index": opened.output_index, "content_index": 0}
        part = {"type": "output_text", "text": opened.text, "annotations": [], "logprobs": opened.logprobs}
        status = "incomplete" if self._finish_reason in _INCOMPLETE_REASONS else "completed"
        item = {**opened.item, "content": [part], "status": status}
        return [
            {
                "type": "response.output_text.done",
                **where,
                "text": opened.text,
                "logprobs": _without_bytes(opened.logprobs),
            },
            {"type": "response.content_part.done", **where, "part": part},
            self._finished(opened, item),
        ]

    # Function calls: arguments arrive in pieces, several calls may come in one turn.

    def _tool_call_delta(self, call: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        opened = self._calls.get(index)
        if opened is None:
            # A new call closes the text or reasoning before it, and any earlier call (calls stream one by one).
            events += self._close_reasoning() + self._close_message() + self._close_calls()
            item = {
                "id": new_item_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.get("id") or new_item_id("call"),
                "name": function.get("name") or "",
                "arguments": "",
            }
            opened, added = self._open(item)
            self._calls[index] = opened
            events.append(added)
        elif function.get("name"):
            opened.item["name"] += function["name"]
        pieces = function.get("arguments")
        if isinstance(pieces, str) and pieces:
            opened.text += pieces
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": opened.item["id"],
                    "output_index": opened.output_index,
                    "delta": pieces,
                }
            )
        return events

    def _close_calls(self) -> list[Event]:
        events: list[Event] = []
        for opened in self._calls.values():
            if opened.item.get("status") != "in_progress":
                continue
            item = {**opened.item, "arguments": opened.text, "status": "completed"}
            opened.item["status"] = "completed"
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": opened.item["id"],
                    "output_index": opened.output_index,
                    "arguments": opened.text,
                }
            )
            events.append(self._finished(opened, item))
        return events
