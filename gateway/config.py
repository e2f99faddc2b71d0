"""Configuration: one pydantic settings model from YAML, overridden by `GATEWAY_<SECTION>__<KEY>` env variables."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from runs.store import STORAGE_URL_PREFIXES
from runs.upstream.base import JsonSchemaStyle, UpstreamSpec
from runs.upstream.dialects import PRESETS, DialectName

CONFIG_ENV = "GATEWAY_CONFIG"


class ConfigError(Exception):
    """A configuration problem, worded as one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # uvloop measured better in `make bench` (bench/results/2026-11-27.md): asyncio stays as a choice.
    event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    # A connection with no request in progress (none yet, or none since the last response), or whose request's
    # headers have not all arrived, is closed after this (slowloris, idle keep-alive).
    idle_timeout_seconds: float = Field(30.0, gt=0)
    # A request body must arrive within this plus its length at min_body_bytes_per_second, else 408.
    body_timeout_seconds: float = Field(10.0, gt=0)
    min_body_bytes_per_second: int = Field(64 * 1024, ge=1)
    # Open connections one peer address may hold (0: no cap). Behind a proxy every client is the proxy's address.
    max_connections_per_ip: int = Field(1024, ge=0)
    # While a streamed create awaits its first output, young garbage collections are held back, this long at most
    # (0: they are not); a burst of creates then gets its first tokens without the collector's pauses
    # (gateway/gc_pacing.py).
    gc_hold_seconds: float = Field(0.5, ge=0)


class StorageConfig(_Section):
    url: str = "memory://"
    key_prefix: str = Field("rgw", min_length=1)
    retention_seconds: int = Field(86400, ge=1)
    max_connections: int = Field(512, ge=4)
    # Redis replicas that must have a response's terminal event before any client is told of it (WAIT); 0 = none.
    replica_acks: int = Field(0, ge=0)
    replica_ack_timeout_ms: int = Field(1000, ge=1)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        schemes = STORAGE_URL_PREFIXES
        if not url.startswith(schemes):
            raise ValueError("must start with " + ", ".join(schemes[:-1]) + " or " + schemes[-1])
        if url.startswith(("redis://", "rediss://")):
            _ = urlsplit(url).port  # raises for a port that is not a number: named now, not by a traceback later
        return url

    @model_validator(mode="after")
    def _replicas_only_on_redis(self) -> StorageConfig:
        if self.replica_acks and self.url.startswith("memory://"):
            raise ValueError("replica_acks needs a Redis storage url: the embedded store has no replicas")
        return self


_T = TypeVar("_T")


def _chosen(option: _T | None, preset: _T) -> _T:
    return preset if option is None else option


_CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})


class UpstreamConfig(_Section):
    name: str = Field(min_length=1)
    kind: Literal["responses", "chat"] = "responses"
    base_url: str = Field(min_length=1)
    api_key_env: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    model_map: dict[str, str] = Field(default_factory=dict)
    max_retries: int = Field(2, ge=0, le=10)
    retry_backoff_seconds: float = Field(0.5, ge=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    read_timeout_seconds: float = Field(600.0, gt=0)
    # Chat only: the server's dialect (runs/upstream/dialects.py), and each of its options to override one by one.
    dialect: DialectName = "generic"
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    reasoning_effort: bool | None = None
    json_schema: JsonSchemaStyle | None = None
    stream_usage: bool | None = None
    developer_role: bool | None = None
    # Chat only: what Chat cannot do (hosted tools, reasoning summaries, …) is refused naming the parameter
    # (reject), or left out, logged once and noted in the response's metadata (drop).
    unsupported: Literal["reject", "drop"] = "reject"
    send_metadata: bool = False
    forward_client_key: bool = False
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every call to this upstream

    @field_validator("headers")
    @classmethod
    def _no_credentials_in_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        # Config files get committed and pasted; credentials come from the environment (api_key_env) only.
        named = sorted(name for name in headers if name.lower() in _CREDENTIAL_HEADERS)
        if named:
            raise ValueError(f"{', '.join(named)} would put a credential in the config file: use api_key_env")
        return headers

    def to_spec(self) -> UpstreamSpec:
        """The runtime description; the API key is read from the environment now and never stored."""
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        preset = PRESETS[self.dialect]
        return UpstreamSpec(
            name=self.name,
            kind=self.kind,
            base_url=self.base_url,
            api_key=api_key,
            models=tuple(self.models),
            model_map=dict(self.model_map),
            max_retries=self.max_retries,
            retry_backoff_seconds=self.retry_backoff_seconds,
            connect_timeout_seconds=self.connect_timeout_seconds,
            read_timeout_seconds=self.read_timeout_seconds,
            max_tokens_field=_chosen(self.max_tokens_field, preset.max_tokens_field),
            reasoning_effort=_chosen(self.reasoning_effort, preset.reasoning_effort),
            json_schema=_chosen(self.json_schema, preset.json_schema),
            stream_usage=_chosen(self.stream_usage, preset.stream_usage),
            developer_role=_chosen(self.developer_role, preset.developer_role),
            drop_unsupported=self.unsupported == "drop",
            send_metadata=self.send_metadata,
            forward_client_key=self.forward_client_key,
            extra_headers=dict(self.headers),
        )


class SseConfig(_Section):
    """Server-sent event streams to clients."""

    heartbeat_seconds: float = Field(15.0, gt=0)
    retry_ms: int = Field(1000, ge=0)
    subscriber_buffer_events: int = Field(1024, ge=16)
    write_timeout_seconds: float = Field(30.0, gt=0)
    socket_send_buffer_bytes: int = Field(0, ge=0)


class WebSocketConfig(_Section):
    """WebSocket mode (`GET /v1/responses` with an upgrade): its limits and keep-alive."""

    max_sockets_per_key: int = Field(64, ge=1)
    # As at OpenAI: responses in flight on one socket (more wait for one to end), distinct named lanes
    # (`stream_id`s) over the socket's life; and, the gateway's own bound, creates waiting on one lane.
    max_in_flight_per_socket: int = Field(16, ge=1)
    max_stream_ids_per_socket: int = Field(32, ge=1)
    max_queued_per_lane: int = Field(64, ge=1)
    # A bigger frame closes the socket with 1009 (the message is never buffered whole).
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Pings every this often; a client that does not answer within the next period is closed.
    heartbeat_seconds: float = Field(20.0, gt=0)
    # A socket with nothing in flight and no client message for this long is closed (1000).
    idle_timeout_seconds: float = Field(600.0, gt=0)
    # `store=false` responses this socket remembers for `previous_response_id` continuations.
    unstored_responses_kept: int = Field(32, ge=1)


class SteeringConfig(_Section):
    """Steering (`response.steer`, `POST /v1/responses/{id}/steer`)."""

    max_pending_per_response: int = Field(8, ge=1)


class RunsConfig(_Section):
    """How many runs an instance takes, and how their ownership is kept."""

    max_concurrent: int = Field(64, ge=1)
    lease_seconds: float = Field(15.0, gt=0)
    renew_seconds: float = Field(5.0, gt=0)
    sweep_seconds: float = Field(2.0, gt=0)
    sync_wait_seconds: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _renew_well_within_the_lease(self) -> RunsConfig:
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError("renew_seconds must be at most half of lease_seconds")
        return self


class LimitsConfig(_Section):
    """Bounds on what one request may bring in besides its own body (README, "Security")."""

    # History a request's conversation or previous_response_id chain brings in, counted as stored; beyond it 400
    # history_too_large naming the parameter. It is read, held and sent to the provider again on every turn.
    max_history_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_history_items: int = Field(10_000, ge=1)
    max_chain_length: int = Field(256, ge=1)


class ShutdownConfig(_Section):
    grace_seconds: float = Field(30.0, ge=0)


class LoggingConfig(_Section):
    """The process's log lines (stderr): their level, text or JSON lines, and the access log."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    access_log: bool = True


class ApiKeyConfig(_Section):
    """One gateway API key and the tenant it belongs to. The key itself comes from an environment variable, or
    only its SHA-256 is written here; the raw key is never stored or logged."""

    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    key_env: str | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    max_concurrent_runs: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key_env or key_sha256")
        return self

    def key_hash(self) -> str:
        """The SHA-256 (hex) of the key; raises ConfigError when key_env names an unset variable."""
        if self.key_sha256 is not None:
            return self.key_sha256.lower()
        raw = os.environ.get(self.key_env or "")
        if not raw:
            raise ConfigError(f"auth.keys: environment variable {self.key_env!r} (tenant {self.tenant!r}) is not set")
        return hashlib.sha256(raw.encode()).hexdigest()


class AuthConfig(_Section):
    enabled: bool = False
    keys: list[ApiKeyConfig] = Field(default_factory=list)


class IdempotencyConfig(_Section):
    """Idempotency-Key on creating POSTs."""

    ttl_seconds: int = Field(86400, ge=1)


class MetricsConfig(_Section):
    """Prometheus metrics at `/metrics`: on the main port (no API key asked, like /healthz, unless `require_auth`),
    or on a port of its own, never behind auth."""

    enabled: bool = True
    port: int | None = Field(None, ge=0, le=65535)  # None: served on the main port
    host: str | None = None  # the address of `port`; None: server.host
    require_auth: bool = False  # on the main port: ask for an API key like every /v1 route

    @model_validator(mode="after")
    def _auth_only_on_the_main_port(self) -> MetricsConfig:
        if self.require_auth and self.port is not None:
            raise ValueError("require_auth applies on the main port only: a separate port is never behind auth")
        return self


class SimulatorConfig(_Section):
    """The built-in simulated model, served when no upstream is configured."""

    tokens: int = Field(20, ge=1)
    token_delay_ms: float = Field(20.0, ge=0)
    ttft_ms: float = Field(50.0, ge=0)


def _refuse_duplicates(what: str, names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate {what} name {duplicates[0]!r}")


WebhookEvent = Literal["response.completed", "response.failed", "response.cancelled", "response.incomplete"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = typing.get_args(WebhookEvent)


class WebhookEndpointConfig(_Section):
    """One receiver of webhooks. Its signing secret comes from an environment variable (`whsec_...` as OpenAI
    issues them, or any string), never from this file."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(pattern=r"^https?://[^\s]+$")
    secret_env: str = Field(min_length=1)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1)
    tenants: list[str] = Field(default_factory=list)  # empty: every tenant's responses

    def secret(self) -> str:
        """The signing secret; raises ConfigError when it is unset or not a valid `whsec_` secret."""
        raw = os.environ.get(self.secret_env, "")
        where = f"webhooks.endpoints: environment variable {self.secret_env!r} (endpoint {self.name!r})"
        if not raw:
            raise ConfigError(f"{where} is not set")
        if raw.startswith("whsec_"):
            try:
                base64.b64decode(raw.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                raise ConfigError(f"{where} is not valid base64 after whsec_") from None
        return raw


class WebhooksConfig(_Section):
    """Webhooks for background responses that end (see runs/webhooks.py)."""

    endpoints: list[WebhookEndpointConfig] = Field(default_factory=list)
    poll_seconds: float = Field(1.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)
    first_retry_seconds: float = Field(5.0, gt=0)
    max_retry_seconds: float = Field(3600.0, gt=0)
    give_up_after_seconds: float = Field(72 * 3600.0, gt=0)
    max_in_flight: int = Field(16, ge=1)

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, endpoints: list[WebhookEndpointConfig]) -> list[WebhookEndpointConfig]:
        _refuse_duplicates("endpoint", [endpoint.name for endpoint in endpoints])
        return endpoints


class TracingConfig(_Section):
    """OpenTelemetry tracing (README, "Tracing"): spans of requests, runs and provider calls, sent over OTLP/HTTP."""

    enabled: bool = False
    # The OTLP/HTTP traces URL. Unset: the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    # OTEL_EXPORTER_OTLP_ENDPOINT (+ /v1/traces), else http://localhost:4318/v1/traces. The exporter's headers
    # (credentials) come from OTEL_EXPORTER_OTLP_HEADERS only.
    otlp_endpoint: str | None = None
    service_name: str | None = None  # unset: OTEL_SERVICE_NAME, else responses-gateway
    # The share of traces started here that are recorded; a request's sampled `traceparent` decides for its own.
    sample_ratio: float = Field(1.0, ge=0, le=1)


class Settings(BaseSettings):
    """Every setting of a gateway process. Precedence: CLI flags > environment > YAML file > defaults."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    server: ServerConfig = Field(default_factory=lambda: ServerConfig())
    storage: StorageConfig = Field(default_factory=lambda: StorageConfig())
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    sse: SseConfig = Field(default_factory=lambda: SseConfig())
    idempotency: IdempotencyConfig = Field(default_factory=lambda: IdempotencyConfig())
    runs: RunsConfig = Field(default_factory=lambda: RunsConfig())
    auth: AuthConfig = Field(default_factory=lambda: AuthConfig())
    shutdown: ShutdownConfig = Field(default_factory=lambda: ShutdownConfig())
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())
    simulator: SimulatorConfig = Field(default_factory=lambda: SimulatorConfig())
    websocket: WebSocketConfig = Field(default_factory=lambda: WebSocketConfig())
    steering: SteeringConfig = Field(default_factory=lambda: SteeringConfig())
    webhooks: WebhooksConfig = Field(default_factory=lambda: WebhooksConfig())
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig())
    tracing: TracingConfig = Field(default_factory=lambda: TracingConfig())
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig())

    @field_validator("upstreams")
    @classmethod
    def _unique_names(cls, upstreams: list[UpstreamConfig]) -> list[UpstreamConfig]:
        _refuse_duplicates("upstream", [upstream.name for upstream in upstreams])
        return upstreams

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML source reads `yaml_file` from model_config; load_settings sets it on a subclass per file.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}"


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Settings from `config_file` (or $GATEWAY_CONFIG), the environment, and `overrides` (nested dicts from CLI
    flags). Raises ConfigError with one line naming the bad key."""
    path_text = config_file or os.environ.get(CONFIG_ENV)
    if path_text:
        path = Path(path_text)
        if not path.is_file():
            raise ConfigError(f"config file {path_text!r} does not exist")
        settings_cls: type[Settings] = type(
            "FileSettings",
            (Settings,),
            {"model_config": SettingsConfigDict(**{**Settings.model_config, "yaml_file": path})},
        )
    else:
        settings_cls = Settings
    try:
        return settings_cls(**overrides)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path_text!r} is not valid YAML: {error}".replace("\n", " ")) from None
