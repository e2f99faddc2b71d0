"""The simulator's knobs: server settings, the per-request plan read from metadata or headers, injected faults,
the counters tests assert on, and ``json_route``, through which the non-generating routes answer."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

RESPONSES_PATH = "/v1/responses"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
COMPACT_PATH = "/v1/responses/compact"
INPUT_TOKENS_PATH = "/v1/responses/input_tokens"
TOKENIZE_PATH = "/tokenize"
REQUEST_LOG_SIZE = 200

FAULT_HANG = "hang"
FAULT_ERROR_EVENT = "error_event"
FAULT_HTTP_PREFIX = "http_"
FAILURE_MESSAGE = "simulated failure"
_ERROR_CODES = {429: "rate_limit_exceeded"}


@dataclass(slots=True)
class SimulatorSettings:
    """Server-wide defaults; each request may override them with knobs (see the module docstring)."""

    tokens: int = 20  # output tokens per response by default
    token_delay_ms: float = 20  # delay between tokens
    ttft_ms: float = 50  # delay before the first output event (after response.created/in_progress)
    # Serve /v1/responses/compact and /v1/responses/input_tokens; False (``simulate --no-compact``) answers
    # them 404, like a Responses provider without them, so a gateway's fallback can be tested.
    compact: bool = True
    # How the Chat endpoint behaves (``simulate --chat-dialect``): "openai"; "llama-cpp-python", which refuses a
    # ``json_schema`` response_format with a 500 naming its own source file (as that server does), takes
    # ``{"type": "json_object", "schema": …}`` instead, and never streams usage; "vllm", which also takes a
    # schema as ``guided_json``.
    chat_dialect: str = "openai"
    # Models ``GET /v1/models`` lists besides the simulator's own (``simulate --extra-models a,b``).
    extra_models: tuple[str, ...] = ()


@dataclass(slots=True)
class SimulatorStats:
    """What the simulator has seen, for tests and benchmarks to assert on."""

    requests: int = 0
    active: int = 0
    completed: int = 0
    disconnects: int = 0
    requests_by_tag: Counter[str] = field(default_factory=Counter)
    requests_by_path: Counter[str] = field(default_factory=Counter)
    disconnects_by_tag: Counter[str] = field(default_factory=Counter)
    # Generations running now, and the most ever running at once, by tag: what a concurrency limit is checked by.
    active_by_tag: Counter[str] = field(default_factory=Counter)
    peak_active_by_tag: Counter[str] = field(default_factory=Counter)
    recent: deque[tuple[str | None, Any]] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))

    def record(self, tag: str | None, body: Any, path: str) -> None:
        self.requests += 1
        self.requests_by_path[path] += 1
        if tag is not None:
            self.requests_by_tag[tag] += 1
        self.recent.append((tag, body))

    def started(self, tag: str | None) -> None:
        self.active += 1
        if tag is not None:
            self.active_by_tag[tag] += 1
            self.peak_active_by_tag[tag] = max(self.peak_active_by_tag[tag], self.active_by_tag[tag])

    def ended(self, tag: str | None) -> None:
        self.active -= 1
        if tag is not None:
            self.active_by_tag[tag] -= 1

    def disconnected(self, tag: str | None) -> None:
        self.disconnects += 1
        if tag is not None:
            self.disconnects_by_tag[tag] += 1

    def reset(self) -> None:
        self.requests = self.completed = self.disconnects = 0
        self.requests_by_tag.clear()
        self.requests_by_path.clear()
        self.disconnects_by_tag.clear()
        self.peak_active_by_tag = Counter(+self.active_by_tag)
        self.recent.clear()

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "active": self.active,
            "completed": self.completed,
            "disconnects": self.disconnects,
            "requests_by_tag": dict(self.requests_by_tag),
            # Both generation endpoints always appear, so a test can compare the whole dict without knowing which
            # ran; the side routes (compact, counting) appear once used.
            "requests_by_path": {
                **{path: 0 for path in (RESPONSES_PATH, CHAT_COMPLETIONS_PATH)},
                **self.requests_by_path,
            },
            "disconnects_by_tag": dict(self.disconnects_by_tag),
            "peak_active_by_tag": dict(self.peak_active_by_tag),
        }


SIM_SETTINGS_KEY = web.AppKey("sim_settings", SimulatorSettings)
SIM_STATS_KEY = web.AppKey("sim_stats", SimulatorStats)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type="application/json")


class _RequestError(Exception):
    """A problem answered with an OpenAI error envelope before any streaming starts."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        error_type = "server_error" if self.status >= 500 else "invalid_request_error"
        envelope = {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}
        # A short retry hint keeps SDK retries of simulated rate limits fast in tests.
        headers = {"retry-after-ms": "10"} if self.status == 429 else None
        return _json(envelope, status=self.status, headers=headers)


class _ClientGone(Exception):
    """The client closed the connection; stop producing."""


class _Crash(Exception):
    """``sim_fail_after`` was reached; the connection must be dropped."""


@dataclass(slots=True)
class _Plan:
    """The knobs of one request, resolved against the settings."""

    tokens: int
    cap: int | None  # the body's output-token limit; the answer is cut short (incomplete) when it is longer
    token_delay_s: float
    ttft_s: float
    fault: str | None
    fail_after: int | None


def _knob(request: web.Request, metadata: Mapping[str, Any], name: str) -> str | None:
    header = request.headers.get("x-" + name.replace("_", "-"))
    if header is not None:
        return header
    value = metadata.get(name)
    return None if value is None else str(value)


def _number(request: web.Request, metadata: Mapping[str, Any], name: str, default: float) -> float:
    raw = _knob(request, metadata, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise _RequestError(400, f"{name} must be a number >= 0, got {raw!r}", param=f"metadata.{name}")
    return value


def _metadata(body: Any) -> Mapping[str, Any]:
    metadata = body.get("metadata") if isinstance(body, Mapping) else None
    return metadata if isinstance(metadata, Mapping) else {}


def _faults_spent(request: web.Request, metadata: Mapping[str, Any]) -> bool:
    """With ``sim_fail_first=N`` the faults hit only the first N requests of the tag (a flaky provider that
    recovers), so retries can be tested end to end."""
    if _knob(request, metadata, "sim_fail_first") is None:
        return False
    tag = _knob(request, metadata, "sim_tag")
    if tag is None:
        raise _RequestError(400, "sim_fail_first needs sim_tag", param="metadata.sim_fail_first")
    limit = int(_number(request, metadata, "sim_fail_first", 0))
    return request.app[SIM_STATS_KEY].requests_by_tag[tag] > limit


def _plan(
    request: web.Request,
    body: Mapping[str, Any],
    settings: SimulatorSettings,
    cap_fields: tuple[str, ...] = ("max_output_tokens",),
) -> _Plan:
    """Resolve the knobs; ``cap_fields`` name the body's output-token limits, the first one given wins."""
    metadata = _metadata(body)
    tokens = int(_number(request, metadata, "sim_tokens", settings.tokens))
    for name in cap_fields:
        limit = body.get(name)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise _RequestError(400, f"{name} must be an integer >= 1", param=name)
    cap = next((body[name] for name in cap_fields if body.get(name) is not None), None)
    if _faults_spent(request, metadata):
        return _Plan(
            tokens=tokens,
            cap=cap,
            token_delay_s=_number(request, metadata, "sim_token_delay_ms", settings.token_delay_ms) / 1000,
            ttft_s=_number(request, metadata, "sim_ttft_ms", settings.ttft_ms) / 1000,
            fault=None,
            fail_after=None,
        )
    fault = _knob(request, metadata, "sim_fault")
    if fault is not None and fault not in (FAULT_HANG, FAULT_ERROR_EVENT):
        status = fault.removeprefix(FAULT_HTTP_PREFIX)
        if not (fault.startswith(FAULT_HTTP_PREFIX) and status.isdigit() and 400 <= int(status) <= 599):
            raise _RequestError(400, f"unknown sim_fault {fault!r}", param="metadata.sim_fault")
        # The injected HTTP error travels the same path as a genuine one, answered before any streaming.
        code = "server_error" if int(status) >= 500 else "simulated_error"
        raise _RequestError(int(status), f"simulated HTTP {status}", code=_ERROR_CODES.get(int(status), code))
    fail_after = None
    if _knob(request, metadata, "sim_fail_after") is not None:
        fail_after = int(_number(request, metadata, "sim_fail_after", 0))
        if fail_after < 1:
            raise _RequestError(400, "sim_fail_after must be >= 1", param="metadata.sim_fail_after")
    return _Plan(
        tokens=tokens,
        cap=cap,
        token_delay_s=_number(request, metadata, "sim_token_delay_ms", settings.token_delay_ms) / 1000,
        ttft_s=_number(request, metadata, "sim_ttft_ms", settings.ttft_ms) / 1000,
        fault=fault,
        fail_after=fail_after,
    )


async def json_route(
    request: web.Request, handle: Callable[[web.Request, dict[str, Any]], Awaitable[Any]]
) -> web.Response:
    """Answer a plain (non-generating) JSON route: log and count the request like a generation, then answer
    ``handle``'s result as JSON, or its ``_RequestError`` (an ``http_*`` ``sim_fault`` too) as an envelope."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    metadata = _metadata(body)
    request.app[SIM_STATS_KEY].record(_knob(request, metadata, "sim_tag"), body, request.path)
    try:
        if not isinstance(body, dict):
            raise _RequestError(400, "The request body must be a JSON object.")
        # Only the HTTP faults mean anything here; this raises them (and refuses bad knobs), the plan is unused.
        _plan(request, {"metadata": metadata}, request.app[SIM_SETTINGS_KEY])
        return _json(await handle(request, body))
    except _RequestError as error:
        return error.response()
