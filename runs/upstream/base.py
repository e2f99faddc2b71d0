"""What the run needs from a model provider: one streamed turn as Responses API event dicts."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

UpstreamKind = Literal["responses", "chat"]
# How a Chat provider takes a JSON schema for structured output: OpenAI's `response_format` json_schema;
# `{"type": "json_object", "schema": …}` (llama-cpp-python, which refuses json_schema); vLLM's `guided_json`.
JsonSchemaStyle = Literal["response_format", "json_object_schema", "guided_json"]


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One configured provider. `models` are glob patterns matched against a request's `model`."""

    name: str
    kind: UpstreamKind
    base_url: str
    api_key: str | None = None
    models: tuple[str, ...] = ("*",)
    max_retries: int = 2
    retry_backoff_seconds: float = 0.5
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 600.0
    extra_headers: dict[str, str] = field(default_factory=dict)
    model_map: dict[str, str] = field(default_factory=dict)
    max_tokens_field: str = "max_tokens"
    reasoning_effort: bool = False
    json_schema: JsonSchemaStyle = (
        "response_format"  # chat only: how a JSON schema is sent (runs/upstream/chat_request.py)
    )
    stream_usage: bool = True  # chat only: whether the stream carries usage when asked
    developer_role: bool = False  # chat only: whether a developer message may be sent as such
    drop_unsupported: bool = False  # chat only: leave out (and note) what Chat cannot do, instead of a 400
    send_metadata: bool = False
    forward_client_key: bool = False  # send the client's own API key instead of the configured one

    def upstream_model(self, model: str) -> str:
        """The provider's name for a model the client asked for."""
        return self.model_map.get(model, model)

    def call_key(self, client_key: str | None) -> str | None:
        """The key a provider call carries instead of the configured one: the client's own, for a pass-through
        upstream."""
        return client_key if self.forward_client_key else None


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A request's input tokens and who counted them: the provider's own counting endpoint (`upstream`), its
    tokenizer (`tokenizer`), or the gateway's estimate (`estimate`) where the provider offers neither."""

    input_tokens: int
    source: Literal["upstream", "tokenizer", "estimate"]


# The codes a failed Response's `error.code` may take (the SDK's `ResponseError.code`, a closed set).
RESPONSE_ERROR_CODES = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "data_residency_mismatch",
        "bio_policy",
        "misalignment_policy_violation",
        "vector_store_timeout",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


class UpstreamFailure(Exception):
    """The provider refused or broke the turn. `status` is its HTTP status when it answered with one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after_seconds: float | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # What the provider itself said, in full: for the gateway's log only (it may name the provider's files,
        # hosts or stack frames), never for clients, who get `message`.
        self.detail = detail
        self.status = status
        self.code = code
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds

    def response_error_code(self) -> str:
        """The `error.code` of the failed Response, which clients parse as one of a fixed set: the provider's own
        code when it is one of them, else the one its status comes closest to."""
        if self.status == 429:
            return "rate_limit_exceeded"
        if self.code in RESPONSE_ERROR_CODES:
            return self.code
        if self.status in (400, 413, 422):
            return "invalid_prompt"  # the request's content, as the provider judged it
        return "server_error"


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What a provider said of its answer, for the call's trace: its own id and model, why it stopped, and its
    usage (in the Responses shape)."""

    response_id: str | None
    model: str | None
    finish_reasons: Sequence[str]
    usage: Mapping[str, Any] | None


class CallTrace(Protocol):
    """The trace of one logical provider call, its retries included (`runs.tracing` makes one when tracing is
    on): `headers` (the W3C `traceparent`) go with every attempt, and the adapter reports what the provider
    `answered`."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def retrying(self, failure: UpstreamFailure) -> None: ...

    def answered(self, answer: ProviderAnswer) -> None: ...


class Upstream(Protocol):
    """A provider adapter. `prepare` turns a Responses body into the provider's request (raising InvalidRequest
    for what it cannot honour, before anything is stored); `stream_turn` sends it and yields Responses streaming
    events (dicts with `type`), which the run renumbers, in lists of those that arrived together (the run stores
    each list in one append). Provider errors are raised as UpstreamFailure."""

    spec: UpstreamSpec

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """The provider's request body for a Responses body."""
        ...

    def stream_turn(
        self, body: dict[str, Any], *, api_key: str | None = None, call: CallTrace | None = None
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Stream one model turn for the prepared body; `api_key` replaces the configured key (pass-through);
        `call`, when traced, gives the headers to send and hears what the provider answered."""
        ...

    async def count_input_tokens(self, body: dict[str, Any], *, api_key: str | None = None) -> TokenCount | None:
        """The input tokens of a Responses body (its history already in `input`), as the provider counts them;
        None when it has no way to count."""
        ...

    async def compact(self, body: dict[str, Any], *, api_key: str | None = None) -> dict[str, Any] | None:
        """The provider's own compaction (`POST /responses/compact`) of a Responses body, as it answers it; None
        when it has none (the gateway then compacts by asking the model for a summary)."""
        ...

    async def list_models(self) -> list[str]:
        """The model ids the provider itself lists."""
        ...

    async def close(self) -> None:
        """Release connections."""
