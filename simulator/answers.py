"""What the simulated model answers: one function call, or text (plain, or JSON for a structured-output format).

Both endpoints decide alike, each reading its own API's spelling of ``tools``, ``tool_choice`` and the output
format (``text.format`` / ``response_format``):

* With function tools and a ``tool_choice`` other than ``"none"``, the model calls one tool, once: the one
  ``tool_choice`` names, else the first (``allowed_tools`` narrows the list). Its arguments are
  ``schema_value(parameters)``, valid for the tool's JSON schema. Once the conversation holds a call or a tool
  output, the model has had its turn with tools and answers in text, so an agent loop ends. (A call left
  unanswered in the history, which OpenAI would refuse, counts as the turn taken too.)
* Otherwise text: ``simulated_text`` words; for ``json_object`` the JSON ``{"answer": <those words>}``; for
  ``json_schema`` a value valid for the schema. JSON text goes out in pieces of a few characters (each an
  output token), so it still streams as several deltas. The output-token cap cuts any text short (never a
  call, whose arguments must stay whole JSON).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from simulator.plan import _RequestError
from simulator.schema_values import schema_value
from simulator.text import simulated_text

# Small enough that every call's arguments (and JSON answer) arrive in several pieces, which clients reassemble.
ARGUMENT_PIECE_CHARS = 5

ChoiceMode = Literal["none", "auto", "required"]
FormatKind = Literal["text", "json_object", "json_schema"]


def pieces(text: str) -> list[str]:
    """``text`` in the small pieces it streams in."""
    return [text[start : start + ARGUMENT_PIECE_CHARS] for start in range(0, len(text), ARGUMENT_PIECE_CHARS)]


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    parameters: Any  # the JSON schema of the arguments (None when the tool declares none)


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ChoiceMode
    named: str | None = None  # the one function ``tool_choice`` forces
    allowed: tuple[str, ...] | None = None  # ``allowed_tools``: the functions the model may pick from


@dataclass(frozen=True, slots=True)
class OutputFormat:
    kind: FormatKind
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str

    def pieces(self) -> list[str]:
        return pieces(self.arguments)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class Answer:
    """The decided answer: a function call, or the text pieces as sent (cut by the cap when ``truncated``)."""

    text: list[str]
    truncated: bool = False
    call: ToolCall | None = None


def decide(
    *,
    input_text: str,
    tokens: int,
    cap: int | None,
    tools: list[FunctionTool],
    choice: ToolChoice,
    called_before: bool,
    output_format: OutputFormat,
) -> Answer:
    """The answer to a conversation flattened to ``input_text`` (the seed of everything generated)."""
    tool = _tool_to_call(tools, choice, called_before)
    if tool is not None:
        arguments = orjson.dumps(schema_value(tool.parameters or {}, f"{tool.name}\n{input_text}")).decode()
        return Answer(text=[], call=ToolCall(new_call_id(), tool.name, arguments))
    return text_answer(input_text, tokens, cap, output_format)


def text_answer(input_text: str, tokens: int, cap: int | None, output_format: OutputFormat) -> Answer:
    """The text answer in ``output_format``, cut at ``cap`` output tokens."""
    if output_format.kind == "json_schema":
        full = pieces(orjson.dumps(schema_value(output_format.schema or {}, input_text)).decode())
    elif output_format.kind == "json_object":
        full = pieces(orjson.dumps({"answer": "".join(simulated_text(input_text, tokens))}).decode())
    else:
        full = simulated_text(input_text, tokens)
    shown = full if cap is None else full[:cap]
    return Answer(text=shown, truncated=len(shown) < len(full))


def _tool_to_call(tools: list[FunctionTool], choice: ToolChoice, called_before: bool) -> FunctionTool | None:
    if choice.named is not None and all(tool.name != choice.named for tool in tools):
        raise _RequestError(400, f"Tool choice '{choice.named}' not found in 'tools' parameter.", param="tool_choice")
    if choice.mode == "none" or called_before:
        return None
    wanted = (choice.named,) if choice.named is not None else choice.allowed
    candidates = [tool for tool in tools if wanted is None or tool.name in wanted]
    return candidates[0] if candidates else None


# --- each API's spelling ---


def _mode(value: Any, param: str) -> ChoiceMode:
    if value in (None, "auto"):
        return "auto"
    if value == "none":
        return "none"
    if value == "required":
        return "required"
    raise _RequestError(400, f"Invalid value for {param}: {value!r}.", param=param)


def responses_tools(body: Mapping[str, Any]) -> list[FunctionTool]:
    """The function tools of a Responses request (hosted and custom tools cannot be simulated)."""
    tools = body.get("tools")
    return [
        FunctionTool(tool["name"], tool.get("parameters"))
        for tool in (tools if isinstance(tools, list) else ())
        if isinstance(tool, Mapping) and tool.get("type") == "function" and isinstance(tool.get("name"), str)
    ]


def chat_tools(body: Mapping[str, Any]) -> list[FunctionTool]:
    """The function tools of a Chat Completions request."""
    found: list[FunctionTool] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str) and function["name"]:
            found.append(FunctionTool(function["name"], function.get("parameters")))
    return found


def responses_tool_choice(body: Mapping[str, Any]) -> ToolChoice:
    value = body.get("tool_choice")
    if not isinstance(value, Mapping):
        return ToolChoice(_mode(value, "tool_choice"))
    if value.get("type") == "function":
        return ToolChoice("required", named=str(value.get("name")))
    if value.get("type") == "allowed_tools":
        names = [tool.get("name") for tool in value.get("tools") or () if isinstance(tool, Mapping)]
        allowed = tuple(name for name in names if isinstance(name, str))
        return ToolChoice(_mode(value.get("mode"), "tool_choice.mode"), allowed=allowed)
    return ToolChoice("none")  # a hosted or custom tool: no function call to simulate


def chat_tool_choice(body: Mapping[str, Any]) -> ToolChoice:
    value = body.get("tool_choice")
    if not isinstance(value, Mapping):
        return ToolChoice(_mode(value, "tool_choice"))
    if value.get("type") == "function":
        function = value.get("function")
        return ToolChoice("required", named=str(function.get("name") if isinstance(function, Mapping) else None))
    if value.get("type") == "allowed_tools":
        spec = value.get("allowed_tools")
        spec = spec if isinstance(spec, Mapping) else {}
        functions = [tool.get("function") for tool in spec.get("tools") or () if isinstance(tool, Mapping)]
        allowed = tuple(f["name"] for f in functions if isinstance(f, Mapping) and isinstance(f.get("name"), str))
        return ToolChoice(_mode(spec.get("mode"), "tool_choice.allowed_tools.mode"), allowed=allowed)
    return ToolChoice("none")


def responses_called_before(body: Mapping[str, Any]) -> bool:
    """Whether the input already holds a tool call or a tool output."""
    input_ = body.get("input")
    kinds = ("function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output")
    return isinstance(input_, list) and any(isinstance(item, Mapping) and item.get("type") in kinds for item in input_)


def chat_called_before(body: Mapping[str, Any]) -> bool:
    """Whether the messages already hold an assistant tool call or a tool message."""
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(message, Mapping)
        and (
            message.get("role") in ("tool", "function")  # "function": the legacy tool-result role
            or bool(message.get("tool_calls") or message.get("function_call"))
        )
        for message in messages
    )


def responses_format(body: Mapping[str, Any]) -> OutputFormat:
    text = body.get("text")
    spec = text.get("format") if isinstance(text, Mapping) else None
    return _format(spec, "text.format", lambda spec: spec)


# What llama-cpp-python answered a `json_schema` response_format with (a 500 naming its own source).
LLAMA_CPP_JSON_SCHEMA_REFUSAL = (
    "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should be 'text' or "
    "'json_object' [type=literal_error] (/opt/venv/lib/python3.11/site-packages/llama_cpp/server/types.py:191)"
)


def chat_format(body: Mapping[str, Any], dialect: str = "openai") -> OutputFormat:
    """The output format a Chat request asks for, as the server of `dialect` reads it."""
    spec = body.get("response_format")
    if dialect == "llama-cpp-python" and isinstance(spec, Mapping):
        if spec.get("type") == "json_schema":
            raise _RequestError(500, LLAMA_CPP_JSON_SCHEMA_REFUSAL)
        if spec.get("type") == "json_object" and isinstance(spec.get("schema"), Mapping):
            return OutputFormat("json_schema", spec["schema"])  # llama-cpp-python's own way to pass a schema
    if dialect == "vllm" and isinstance(body.get("guided_json"), Mapping):
        return OutputFormat("json_schema", body["guided_json"])
    # Chat nests the schema's name, schema and strict one level down, under "json_schema".
    return _format(spec, "response_format", lambda spec: spec.get("json_schema"))


def _format(spec: Any, param: str, schema_holder: Callable[[Mapping[str, Any]], Any]) -> OutputFormat:
    if spec is None:
        return OutputFormat("text")
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind == "text":
        return OutputFormat("text")
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "json_schema":
        holder = schema_holder(spec)
        schema = holder.get("schema") if isinstance(holder, Mapping) else None
        if not isinstance(schema, Mapping):
            where = f"{param}.schema" if holder is spec else f"{param}.json_schema.schema"
            raise _RequestError(400, f"Missing required parameter: '{where}'.", param=where)
        return OutputFormat("json_schema", schema)
    raise _RequestError(400, f"Invalid value for {param}.type: {kind!r}.", param=f"{param}.type")
