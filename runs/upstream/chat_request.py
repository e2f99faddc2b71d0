"""Translate a Responses request into a Chat Completions request, refusing (400) what Chat cannot express."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runs.errors import InvalidRequest
from runs.upstream.base import JsonSchemaStyle

# Chat has no namespaces: a namespace tool's function `f` of namespace `ns` is sent as the function `ns__f`, and
# calls of it come back as `f` in `ns`.
NAMESPACE_SEPARATOR = "__"
# The key of a prepared Chat body under which the translation's notes for the adapter travel (never sent).
GATEWAY_NOTES = "x_gateway_notes"

# Responses fields the gateway itself implements or that only shape its own output: never sent to the provider.
_HANDLED_ELSEWHERE = frozenset({"model", "input", "instructions", "stream", "stream_options", "store", "background"})
# Fields Responses clients send that mean nothing to a Chat server and must not reach it: Codex's
# `client_metadata` carries its installation and session ids (and OpenAI's Chat refuses unknown arguments).
_CLIENT_ONLY = frozenset({"client_metadata"})
# Responses fields with a Chat Completions equivalent of the same name and meaning.
_SAME_NAME = (
    "temperature",
    "top_p",
    "user",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
)


@dataclass(frozen=True, slots=True)
class ChatDialect:
    """What one Chat Completions provider accepts beyond the common core."""

    max_tokens_field: str = "max_tokens"  # OpenAI's reasoning models want "max_completion_tokens"
    reasoning_effort: bool = False  # whether `reasoning_effort` may be sent
    json_schema: JsonSchemaStyle = "response_format"
    # Whether the stream ends with a usage chunk when asked (`stream_options.include_usage`); when not, the gateway
    # counts usage itself (`ChatUpstream._count_usage`).
    stream_usage: bool = True
    # Whether a `developer` message may be sent as such; most self-hosted chat templates know only `system`.
    developer_role: bool = False
    # What Chat cannot do (hosted tools, reasoning summaries, …): refused naming the parameter (False), or left
    # out, logged and noted in the response's metadata (True: `unsupported: drop`, which Codex's requests need).
    drop_unsupported: bool = False
    # The Response's metadata belongs to the gateway; OpenAI's Chat refuses `metadata` without `store: true`, so it
    # is only sent to providers known to take it (the simulator reads its knobs from it).
    send_metadata: bool = False


def _text_of(content: Any, param: str) -> str:
    """The text of a content value: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise InvalidRequest("Content must be a string or a list of parts.", param=param)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise InvalidRequest(f"Content part type {kind!r} cannot be sent here.", param=f"{param}[{index}]")
    return "".join(texts)


def _user_content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """User/system content: text stays text; images become `image_url` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("Content must be a string or a list of parts.", param=param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not url:
                raise InvalidRequest(
                    "Only images given by image_url (a URL or a data: URL) can be sent to this model.",
                    param=f"{param}[{index}].image_url",
                )
            image: dict[str, Any] = {"url": url}
            if part.get("detail") and part["detail"] != "auto":
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise InvalidRequest(
                f"Content part type {kind!r} is not supported by this model's API.", param=f"{param}[{index}]"
            )
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)  # plain text is understood by every server
    return parts


def _messages(
    instructions: str | None, input_value: Any, translation: _Translation, *, developer_role: bool = False
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if input_value is None:
        return messages
    if isinstance(input_value, str):
        messages.append({"role": "user", "content": input_value})
        return messages
    for index, item in enumerate(input_value):
        param = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role == "assistant":
                messages.append({"role": "assistant", "content": _text_of(item.get("content"), f"{param}.content")})
            elif role in ("user", "system", "developer"):
                # Most self-hosted servers know no "developer" role; it means what "system" means to them.
                chat_role = "system" if role == "developer" and not developer_role else role
                messages.append({"role": chat_role, "content": _user_content(item.get("content"), f"{param}.content")})
            else:
                raise InvalidRequest(f"Unknown message role {role!r}.", param=f"{param}.role")
        elif kind == "function_call":
            name = str(item.get("name"))
            if item.get("namespace"):
                name = flat_name(str(item["namespace"]), name)
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": name, "arguments": item.get("arguments", "")},
            }
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant":
                # Text and the calls of one turn, and parallel calls, stay in one assistant message: strict chat
                # templates (Mistral, Gemma under vLLM / llama.cpp) refuse two assistant messages in a row.
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _text_of(output, f"{param}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # a model's own earlier reasoning: Chat has no way to take it back, and needs none
        else:
            translation.unsupported(f"Input item type {kind!r}", param)
    return _answers_right_after_calls(messages)


def _answers_right_after_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat requires an assistant message's tool calls to be followed at once by the tool messages that answer
    them. Input may put a user message in between (steering input goes before the tool outputs of the
    continuation it joins, as the Responses API has it): such messages move to just after the answers."""
    ordered: list[dict[str, Any]] = []
    waiting: set[Any] = set()  # call ids not answered yet
    held: list[dict[str, Any]] = []  # messages that came before the answers
    for message in messages:
        if message["role"] == "tool" and message.get("tool_call_id") in waiting:
            ordered.append(message)
            waiting.discard(message.get("tool_call_id"))
            if not waiting:
                ordered += held
                held = []
            continue
        if waiting and message["role"] in ("user", "system", "developer"):
            held.append(message)
            continue
        ordered += held
        held = []
        waiting = set()
        ordered.append(message)
        if message["role"] == "assistant" and message.get("tool_calls"):
            waiting = {call.get("id") for call in message["tool_calls"]}
    return ordered + held


def flat_name(namespace: str, name: str) -> str:
    """The Chat function a namespace tool's function becomes (Chat has no namespaces)."""
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}"


class _Translation:
    """What a translation left out (under `unsupported: drop`) and which Chat functions stand for namespaced
    ones: the adapter needs both after the call, so they travel in the prepared body under `GATEWAY_NOTES`."""

    def __init__(self, dialect: ChatDialect) -> None:
        self.drop = dialect.drop_unsupported
        self.dropped: list[str] = []
        self.namespaces: dict[str, list[str]] = {}
        self.sent_names: set[str] = set()  # every Chat function name sent, flattened ones included

    def unsupported(self, what: str, param: str) -> None:
        if not self.drop:
            raise InvalidRequest(f"{what} is not supported by this model's API.", param=param)
        self.dropped.append(param)

    def tools(self, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        translated = []
        for index, tool in enumerate(tools):
            kind = tool.get("type")
            if kind == "function":
                translated.append(self._named(_function(tool, str(tool.get("name"))), f"tools[{index}]"))
            elif kind == "namespace" and isinstance(tool.get("tools"), list):
                for inner_index, inner in enumerate(tool["tools"]):
                    param = f"tools[{index}].tools[{inner_index}]"
                    if not isinstance(inner, dict) or inner.get("type") != "function":
                        self.unsupported(f"Tool type {inner.get('type') if isinstance(inner, dict) else None!r}", param)
                        continue
                    name = flat_name(str(tool.get("name")), str(inner.get("name")))
                    translated.append(self._named(_function(inner, name), param))
                    self.namespaces[name] = [str(tool.get("name")), str(inner.get("name"))]
            else:
                self.unsupported(f"Tool type {kind!r} (only function and namespace tools are)", f"tools[{index}]")
        return translated

    def _named(self, function: dict[str, Any], param: str) -> dict[str, Any]:
        name = function["function"]["name"]
        if name in self.sent_names:
            # Two tools that Chat would know by one name (a function `ns__f` and namespace `ns`'s `f`): calls of
            # one would come back as the other.
            raise InvalidRequest(f"Tool name {name!r} is used twice once namespaces are flattened.", param=param)
        self.sent_names.add(name)
        return function

    def sent_name(self, name: str) -> str:
        """The Chat name of the function a `tool_choice` names: a namespaced one by its flattened name when
        that is the only function of that name."""
        if name in self.sent_names:
            return name
        flattened = [flat for flat, (_, inner) in self.namespaces.items() if inner == name]
        return flattened[0] if len(flattened) == 1 else name

    def notes(self) -> dict[str, Any] | None:
        if not self.dropped and not self.namespaces:
            return None
        return {"dropped": self.dropped, "namespaces": self.namespaces}


def _function(tool: dict[str, Any], name: str) -> dict[str, Any]:
    function = {key: tool[key] for key in ("description", "parameters", "strict") if key in tool}
    return {"type": "function", "function": {"name": name, **function}}


def _tool_choice(choice: Any, translation: _Translation) -> Any:
    """The Chat tool_choice, or None when there is none to send (no tools left, or a hosted tool dropped)."""
    if isinstance(choice, str):
        return choice if translation.sent_names else None  # Chat servers refuse a tool_choice without tools
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": translation.sent_name(str(choice["name"]))}}
    translation.unsupported("This tool_choice", "tool_choice")
    return None


def _structured_output(text: dict[str, Any], style: JsonSchemaStyle) -> dict[str, Any]:
    """The Chat fields that ask for `text.format`, in the provider's own style (empty for plain text)."""
    format_ = text.get("format") or {"type": "text"}
    if not isinstance(format_, dict):
        raise InvalidRequest("text.format must be an object.", param="text.format")
    kind = format_.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        if style == "json_object_schema":
            return {"response_format": {"type": "json_object", "schema": format_.get("schema")}}
        if style == "guided_json":
            return {"guided_json": format_.get("schema")}
        schema = {key: format_[key] for key in ("name", "schema", "strict", "description") if key in format_}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise InvalidRequest(f"Unknown text format type {kind!r}.", param="text.format.type")


def chat_request(body: dict[str, Any], *, model: str, dialect: ChatDialect) -> dict[str, Any]:
    """The Chat Completions body for a Responses body (already validated, without the gateway's own fields).

    Everything Chat can express is translated; anything it cannot honour is a 400 naming the parameter, or under
    `unsupported: drop` left out and noted (never silently). Fields this module does not know (provider
    extensions such as `top_k`) pass through.
    """
    translation = _Translation(dialect)
    chat: dict[str, Any] = {
        "model": model,
        "messages": _messages(
            body.get("instructions"), body.get("input"), translation, developer_role=dialect.developer_role
        ),
        "stream": True,
    }
    if dialect.stream_usage:
        chat["stream_options"] = {"include_usage": True}
    for name in _SAME_NAME:
        if body.get(name) is not None:
            chat[name] = body[name]
    if dialect.send_metadata and body.get("metadata"):
        chat["metadata"] = body["metadata"]
    tools = translation.tools(body["tools"]) if body.get("tools") else []
    if tools:
        chat["tools"] = tools
    elif "parallel_tool_calls" in chat:
        del chat["parallel_tool_calls"]  # some servers refuse it without tools
    if body.get("tool_choice") is not None:
        tool_choice = _tool_choice(body["tool_choice"], translation)
        if tool_choice is not None:
            chat["tool_choice"] = tool_choice
    if body.get("max_output_tokens") is not None:
        chat[dialect.max_tokens_field] = body["max_output_tokens"]
    if body.get("text"):
        chat.update(_structured_output(body["text"], dialect.json_schema))
        if body["text"].get("verbosity") is not None:
            chat["verbosity"] = body["text"]["verbosity"]
    reasoning = body.get("reasoning") or {}
    if reasoning.get("effort") is not None:
        if dialect.reasoning_effort:
            chat["reasoning_effort"] = reasoning["effort"]
        else:
            translation.unsupported("reasoning.effort", "reasoning.effort")
    if reasoning.get("summary") is not None or reasoning.get("generate_summary") is not None:  # (its old name)
        translation.unsupported("A reasoning summary", "reasoning.summary")
    include = body.get("include") or []
    for index, value in enumerate(include):
        # Encrypted reasoning is asked for so it can be sent back; a Chat model has none to return: nothing to do.
        if value not in ("message.output_text.logprobs", "reasoning.encrypted_content"):
            translation.unsupported(f"include value {value!r}", f"include[{index}]")
    if "message.output_text.logprobs" in include or body.get("top_logprobs") is not None:
        chat["logprobs"] = True
        if body.get("top_logprobs") is not None:
            chat["top_logprobs"] = body["top_logprobs"]
    if body.get("truncation") == "auto":
        translation.unsupported("truncation 'auto'", "truncation")
    if body.get("max_tool_calls") is not None:
        translation.unsupported("max_tool_calls", "max_tool_calls")
    if body.get("prompt") is not None:
        raise InvalidRequest("prompt is not supported by this model's API.", param="prompt")  # no text to send
    # GATEWAY_NOTES among them: a client's own value under that key is never passed on, nor taken for ours.
    known = _HANDLED_ELSEWHERE | _CLIENT_ONLY | set(_SAME_NAME) | {GATEWAY_NOTES} | {
        "metadata",
        "tools", "tool_choice", "max_output_tokens", "text", "reasoning", "include", "top_logprobs",
        "truncation", "max_tool_calls", "prompt",
    }  # fmt: skip
    for name, value in body.items():
        if name not in known and name not in chat:
            chat[name] = value  # provider extensions pass through untouched
    notes = translation.notes()
    if notes is not None:
        chat[GATEWAY_NOTES] = notes  # removed before the body is sent (runs/upstream/chat.py)
    return chat
