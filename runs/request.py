"""The body of `POST /v1/responses`: its shape (pydantic) and the rules that span fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from runs.errors import InvalidRequest
from runs.items import check_input_items

Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]

INCLUDABLE: frozenset[str] = frozenset(get_args(Includable))

MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
# OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


class ConversationRef(BaseModel):
    """`conversation` given as an object."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str


class StreamOptions(BaseModel):
    """`stream_options`: only meaningful with `stream: true`."""

    model_config = ConfigDict(extra="allow", strict=True)
    include_obfuscation: bool | None = None


class ContextManagement(BaseModel):
    """One `context_management` entry; compaction is the only kind there is."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["compaction"]
    compact_threshold: Annotated[int, Field(ge=1)] | None = None


class CreateResponseRequest(BaseModel):
    """A create request. Unknown fields are kept (and forwarded upstream); known ones are type-checked strictly."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, StringConstraints(min_length=1)]
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    background: bool | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: Metadata | None = None
    include: list[Includable] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[ContextManagement] | None = None
    # The WebSocket lane a response's events are echoed on (WebSocket mode only; never sent upstream). Kept with
    # the stored request so a resumed stream, or a steered response's successor, is on the same lane.
    stream_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None

    @property
    def is_stored(self) -> bool:
        """`store` defaults to true, as in the OpenAI API."""
        return self.store is not False

    @property
    def is_background(self) -> bool:
        return self.background is True

    @property
    def is_streaming(self) -> bool:
        return self.stream is True


def check_request_rules(request: CreateResponseRequest) -> None:
    """Rules across fields that the OpenAI API enforces; raise InvalidRequest naming the param."""
    if request.is_background and not request.is_stored:
        raise InvalidRequest(
            "Background responses require store=true; stateless background requests are rejected.",
            param="background",
        )
    if request.previous_response_id is not None and request.conversation is not None:
        raise InvalidRequest(
            "Mutually exclusive parameters: 'previous_response_id' and 'conversation' cannot be used together.",
            param="previous_response_id",
        )
    if request.stream_options is not None and not request.is_streaming:
        raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")
    if (
        request.input is None
        and request.prompt is None
        and request.previous_response_id is None
        and (request.conversation is None)
    ):
        raise InvalidRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    if isinstance(request.input, list):
        check_input_items(request.input)
