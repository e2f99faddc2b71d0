"""Presets for the Chat Completions servers people run: what each takes beyond the common core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runs.upstream.base import JsonSchemaStyle

DialectName = Literal["generic", "openai", "vllm", "llama.cpp", "ollama"]


@dataclass(frozen=True, slots=True)
class DialectPreset:
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"]
    json_schema: JsonSchemaStyle
    stream_usage: bool
    developer_role: bool
    reasoning_effort: bool


# `generic` is what the gateway assumed before presets: the widely shared core. An upstream's own options
# (`json_schema`, `stream_usage`, …) override its preset's, one by one.
PRESETS: dict[DialectName, DialectPreset] = {
    "generic": DialectPreset("max_tokens", "response_format", True, False, False),
    "openai": DialectPreset("max_completion_tokens", "response_format", True, True, True),
    # vLLM takes response_format json_schema (and `guided_json`, set `json_schema: guided_json` for old versions);
    # its chat templates mostly know no developer role.
    "vllm": DialectPreset("max_completion_tokens", "response_format", True, False, False),
    # llama-cpp-python refuses a json_schema response_format (a 500) but takes a schema in json_object, and streams
    # no usage even when asked: the gateway counts it with the server's /tokenize.
    "llama.cpp": DialectPreset("max_tokens", "json_object_schema", False, False, False),
    "ollama": DialectPreset("max_tokens", "response_format", True, False, False),
}
