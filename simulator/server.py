"""An OpenAI-compatible simulated model server: deterministic text at a set pace, with injectable faults.

The gateway reaches it over HTTP exactly like a real provider: ``POST /v1/responses`` or, for providers
that only speak Chat Completions, ``POST /v1/chat/completions`` (see ``simulator.chat``), streaming or
not. The text is a pure function of the input (``simulated_text(input_text_of(body), tokens)``, or
``chat_input_text_of`` for chat, which flattens equivalent requests to the same string), so tests can predict
it. With function ``tools`` the model calls one once, and a structured-output format makes the text JSON
(``simulator.answers`` says how). Side routes let tests look inside: ``GET /sim/stats``, ``POST /sim/reset``
and ``GET /sim/requests?tag=T`` (the last 200 request bodies of every model route, newest last).

Beside generation: ``POST /v1/responses/compact`` (``simulator.compaction``), ``POST /v1/responses/input_tokens``
and ``POST /tokenize`` (``simulator.counting``); the first two answer 404 under ``SimulatorSettings.compact``
False. Any other ``/v1/responses/...`` route is a 404 in OpenAI's error envelope (the simulator stores nothing).

Per-request knobs, read from the request's ``metadata`` (string values) or, overriding it, from the header
``x-sim-<name with - for _>`` (e.g. ``sim_ttft_ms`` -> ``x-sim-ttft-ms``):

``sim_tokens``
    Output tokens (>= 0) instead of ``SimulatorSettings.tokens``. ``max_output_tokens`` in the body caps it;
    a cap below it ends the response ``incomplete`` (reason ``max_output_tokens``), the text cut short.
``sim_token_delay_ms`` / ``sim_ttft_ms``
    Pace overrides: delay between tokens; delay before the first output event (after ``in_progress``).
``sim_fault``
    ``http_<code>`` (400-599): answer that status with an OpenAI error envelope before any streaming
    (429 also carries ``retry-after-ms: 10``; the side routes honour this one too). ``hang``: after
    ``response.in_progress`` send nothing more and hold the connection until the client goes away.
    ``error_event``: after the first text (or arguments) delta, send a flat ``error`` event then
    ``response.failed`` and end (a non-streaming request gets the failed Response, 200).
``sim_fail_after``
    ``k`` >= 1: after the k-th event (``response.created`` is the 1st) abort the TCP connection with no
    terminal event, like a provider crashing mid-stream. A non-streaming request is aborted at the same point.
``sim_fail_first``
    ``N``: the faults above hit only the first N requests carrying the same ``sim_tag``; later ones are served
    normally (a flaky provider that recovers, for testing retries).
``sim_tag``
    A label: counted in ``requests_by_tag`` and usable as ``/sim/requests?tag=``.

The chat endpoint honours all of these, in its own wire format, and adds ``sim_tool_calls`` and
``sim_reasoning``; ``simulator.chat`` describes how.

Stats: ``requests`` counts every request to a model route (faulted and malformed ones too): generation on
either endpoint and the side routes (by route: ``requests_by_path``); ``active`` the generations running now;
``completed`` the ones that reached a terminal event; ``disconnects`` the ones whose client went away first
(by tag: ``disconnects_by_tag``); ``peak_active_by_tag`` the most generations of a tag ever running at once.
``/sim/reset`` zeroes the counters and the request log (``active`` is a
gauge of live requests, so it is left alone).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from simulator.answers import (
    Answer,
    ToolCall,
    decide,
    responses_called_before,
    responses_format,
    responses_tool_choice,
    responses_tools,
)
from simulator.plan import (
    CHAT_COMPLETIONS_PATH,
    COMPACT_PATH,
    FAILURE_MESSAGE,
    FAULT_ERROR_EVENT,
    FAULT_HANG,
    INPUT_TOKENS_PATH,
    RESPONSES_PATH,
    SIM_SETTINGS_KEY,
    SIM_STATS_KEY,
    TOKENIZE_PATH,
    SimulatorSettings,
    SimulatorStats,
    _ClientGone,
    _Crash,
    _json,
    _knob,
    _metadata,
    _Plan,
    _plan,
    _RequestError,
)
from simulator.text import chat_input_text_of, input_text_of, simulated_text, token_count

# The text functions moved to simulator.text; these names stay importable from here (the benchmarks do).
__all__ = ["chat_input_text_of", "create_simulator_app", "input_text_of", "run_simulator", "simulated_text"]

SIM_MODEL_ID = "sim-1"
MAX_BODY_BYTES = 64 * 1024 * 1024
# Disconnects are noticed by polling the transport, so this bounds how late one is seen while sleeping.
DISCONNECT_POLL_S = 0.02

# Body fields a Response reports back as sent (null when absent).
_ECHOED_FIELDS = (
    "instructions",
    "metadata",
    "temperature",
    "top_p",
    "max_output_tokens",
    "previous_response_id",
)

Event = dict[str, Any]


@dataclass(slots=True)
class _SimulatedResponse:
    """One response being generated: its identity and the events that tell its story."""

    body: Mapping[str, Any]
    plan: _Plan
    answer: Answer
    item_id: str  # the one output item's: ``msg_...`` for a message, ``fc_...`` for a function call
    response_id: str = field(default_factory=lambda: f"resp_sim_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    last: Event = field(default_factory=dict)

    def snapshot(self, status: str, output: list[Event], output_tokens: int | None = None) -> Event:
        """The Response object as it stands; ``output_tokens`` is given once generation has ended."""
        body = self.body
        usage = None
        if output_tokens is not None:
            input_tokens = token_count(input_text_of(body))
            usage = {
                "input_tokens": input_tokens,
                # cache_write_tokens is required by newer SDK models; older ones ignore it.
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            }
        failed = status == "failed"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "model": body.get("model") or SIM_MODEL_ID,
            "output": output,
            "usage": usage,
            # What the request asked for, as OpenAI echoes it (its defaults when absent).
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
            **{key: body.get(key) for key in _ECHOED_FIELDS},
            "background": bool(body.get("background", False)),
            "store": bool(body.get("store", True)),
            "text": body.get("text") or {"format": {"type": "text"}},
            "error": {"code": "server_error", "message": FAILURE_MESSAGE} if failed else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        }

    def frames(self) -> Iterator[tuple[float, bytes]]:
        """The numbered events as SSE frames, remembering the last one for ``answer``."""
        for sequence_number, (delay_s, event) in enumerate(self.steps()):
            event["sequence_number"] = sequence_number
            self.last = event
            yield delay_s, _sse_frame(event)

    def respond(self) -> web.Response:
        return _json(self.last["response"])

    def steps(self) -> Iterator[tuple[float, Event]]:
        """(seconds to wait first, event) pairs, in the order API_NOTES.md gives, not yet numbered."""
        yield 0.0, {"type": "response.created", "response": self.snapshot("in_progress", [])}
        yield 0.0, {"type": "response.in_progress", "response": self.snapshot("in_progress", [])}
        # A hang is a time to first token that never ends; _wait notices the client leaving meanwhile.
        ttft_s = math.inf if self.plan.fault == FAULT_HANG else self.plan.ttft_s
        if self.answer.call is not None:
            yield from self._call_steps(self.answer.call, ttft_s)
        else:
            yield from self._message_steps(ttft_s)

    def _failure(self, partial: Event, output_tokens: int) -> Iterator[tuple[float, Event]]:
        """The ``error_event`` fault's ending: a flat error event, then the failed response."""
        yield 0.0, {"type": "error", "code": "server_error", "message": FAILURE_MESSAGE, "param": None}
        yield 0.0, {"type": "response.failed", "response": self.snapshot("failed", [partial], output_tokens)}

    def _message_steps(self, ttft_s: float) -> Iterator[tuple[float, Event]]:
        plan = self.plan
        tokens = self.answer.text
        failing = plan.fault == FAULT_ERROR_EVENT
        if failing:
            tokens = tokens[:1]
        in_part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        message = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant"}
        part: Event = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield ttft_s, {"type": "response.output_item.added", "output_index": 0, "item": {**message, "content": []}}
        yield 0.0, {"type": "response.content_part.added", **in_part, "part": part}
        for index, token in enumerate(tokens):
            delta = {"type": "response.output_text.delta", **in_part, "delta": token, "logprobs": []}
            yield (plan.token_delay_s if index else 0.0), delta
        part = {**part, "text": "".join(tokens)}
        if failing:
            yield from self._failure({**message, "status": "incomplete", "content": [part]}, len(tokens))
            return
        status = "incomplete" if self.answer.truncated else "completed"
        item = {**message, "status": status, "content": [part]}
        yield 0.0, {"type": "response.output_text.done", **in_part, "text": part["text"], "logprobs": []}
        yield 0.0, {"type": "response.content_part.done", **in_part, "part": part}
        yield 0.0, {"type": "response.output_item.done", "output_index": 0, "item": item}
        yield 0.0, {"type": f"response.{status}", "response": self.snapshot(status, [item], len(tokens))}

    def _call_steps(self, call: ToolCall, ttft_s: float) -> Iterator[tuple[float, Event]]:
        """A function call as OpenAI streams one; each argument piece counts as an output token. The done
        event carries no ``name``: the SDK's model of it has none (the item does)."""
        plan = self.plan
        failing = plan.fault == FAULT_ERROR_EVENT
        argument_pieces = call.pieces()[:1] if failing else call.pieces()
        on_item = {"item_id": self.item_id, "output_index": 0}
        item = {
            "id": self.item_id,
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": "",
        }
        yield ttft_s, {"type": "response.output_item.added", "output_index": 0, "item": item}
        for index, piece in enumerate(argument_pieces):
            delta = {"type": "response.function_call_arguments.delta", **on_item, "delta": piece}
            yield (plan.token_delay_s if index else 0.0), delta
        if failing:
            partial = {**item, "status": "incomplete", "arguments": "".join(argument_pieces)}
            yield from self._failure(partial, len(argument_pieces))
            return
        done = {**item, "status": "completed", "arguments": call.arguments}
        yield 0.0, {"type": "response.function_call_arguments.done", **on_item, "arguments": call.arguments}
        yield 0.0, {"type": "response.output_item.done", "output_index": 0, "item": done}
        yield 0.0, {"type": "response.completed", "response": self.snapshot("completed", [done], len(argument_pieces))}


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait(request: web.Request, seconds: float) -> None:
    """Sleep ``seconds`` (may be inf); raise ``_ClientGone`` within a poll interval of the client leaving."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not _client_gone(request):
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, DISCONNECT_POLL_S))
    raise _ClientGone


def _sse_frame(event: Event) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class _Generation(Protocol):
    """One answer being produced, in whichever API's wire format; ``_serve`` runs its life."""

    @property
    def plan(self) -> _Plan: ...

    def frames(self) -> Iterator[tuple[float, bytes]]:
        """(seconds to wait first, SSE frame) pairs; also played, unwritten, for a non-streaming request."""
        ...

    def respond(self) -> web.Response:
        """The non-streaming reply, once every frame has been played."""
        ...


async def _play(request: web.Request, generation: _Generation, stream: web.StreamResponse | None) -> None:
    """Produce the frames on schedule, writing each at once when streaming."""
    fail_after = generation.plan.fail_after
    for count, (delay_s, frame) in enumerate(generation.frames(), start=1):
        await _wait(request, delay_s)
        if stream is not None:
            try:
                await stream.write(frame)
            except ConnectionResetError as exc:
                raise _ClientGone from exc
        if fail_after is not None and count >= fail_after:
            raise _Crash


async def _serve(
    request: web.Request, prepare: Callable[[web.Request, dict[str, Any]], _Generation]
) -> web.StreamResponse:
    """Handle one generation request: log and count it, let ``prepare`` validate it (raising ``_RequestError``)
    and plan the answer, then play that answer out, streaming or not, surviving faults and vanishing clients."""
    stats = request.app[SIM_STATS_KEY]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    tag = _knob(request, _metadata(body), "sim_tag")
    stats.record(tag, body, request.path)
    if not isinstance(body, dict):
        return _RequestError(400, "The request body must be a JSON object.").response()
    try:
        generation = prepare(request, body)
    except _RequestError as error:
        return error.response()

    stream: web.StreamResponse | None = None
    if body.get("stream"):
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await stream.prepare(request)
        except (ConnectionResetError, asyncio.CancelledError):
            # Gone before the headers went out (a caller that dropped its call at once): a disconnect all the same.
            if _client_gone(request):
                stats.disconnected(tag)
            raise
    stats.started(tag)
    try:
        await _play(request, generation, stream)
    except _ClientGone:
        stats.disconnected(tag)
        return stream if stream is not None else web.Response()  # aiohttp shrugs off the failed write
    except asyncio.CancelledError:
        # Under handler_cancellation=True (as in aiohttp's TestServer) a client leaving cancels us instead.
        if _client_gone(request):
            stats.disconnected(tag)
        raise
    except _Crash:
        if request.transport is not None:
            request.transport.abort()
        return stream if stream is not None else web.Response()
    finally:
        stats.ended(tag)
    stats.completed += 1
    # aiohttp finishes a returned stream itself and shrugs off a client that left just now.
    return stream if stream is not None else generation.respond()


async def _create_response(request: web.Request) -> web.StreamResponse:
    def prepare(request: web.Request, body: dict[str, Any]) -> _Generation:
        plan = _plan(request, body, request.app[SIM_SETTINGS_KEY])
        answer = decide(
            input_text=input_text_of(body),
            tokens=plan.tokens,
            cap=plan.cap,
            tools=responses_tools(body),
            choice=responses_tool_choice(body),
            called_before=responses_called_before(body),
            output_format=responses_format(body),
        )
        item_id = f"fc_{uuid.uuid4().hex}" if answer.call is not None else f"msg_{uuid.uuid4().hex}"
        return _SimulatedResponse(body=body, plan=plan, answer=answer, item_id=item_id)

    return await _serve(request, prepare)


async def _unknown_route(request: web.Request) -> web.Response:
    """Any other ``/v1/responses/...`` route (or a side route turned off): OpenAI's answer to an unknown URL."""
    message = f"Invalid URL ({request.method} {request.path})"
    return _RequestError(404, message).response()


async def _list_models(request: web.Request) -> web.Response:
    names = (SIM_MODEL_ID, *request.app[SIM_SETTINGS_KEY].extra_models)
    return _json(
        {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "simulator"} for name in names],
        }
    )


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATS_KEY].as_json())


async def _reset(request: web.Request) -> web.Response:
    stats = request.app[SIM_STATS_KEY]
    stats.reset()
    return _json(stats.as_json())


async def _requests(request: web.Request) -> web.Response:
    tag = request.query.get("tag")
    recent = request.app[SIM_STATS_KEY].recent
    return _json([body for body_tag, body in recent if tag is None or body_tag == tag])


def create_simulator_app(settings: SimulatorSettings) -> web.Application:
    """The simulator as an aiohttp application, with fresh stats."""
    # These routes are built on this module's machinery, so they can only be imported once that exists.
    from simulator.chat import create_chat_completion
    from simulator.compaction import compact_response
    from simulator.counting import count_input_tokens, count_tokens_llama_cpp_python, tokenize

    # Long conversations make big bodies; aiohttp's 1 MiB default would turn them into 413s.
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIM_SETTINGS_KEY] = settings
    app[SIM_STATS_KEY] = SimulatorStats()
    app.router.add_get("/v1/models", _list_models)
    app.router.add_post(RESPONSES_PATH, _create_response)
    app.router.add_post(CHAT_COMPLETIONS_PATH, create_chat_completion)
    if settings.compact:
        app.router.add_post(COMPACT_PATH, compact_response)
        app.router.add_post(INPUT_TOKENS_PATH, count_input_tokens)
    # After the routes above, which take precedence: aiohttp tries resources in the order they were added.
    app.router.add_route("*", RESPONSES_PATH + "/{rest:.+}", _unknown_route)
    app.router.add_post(TOKENIZE_PATH, tokenize)
    app.router.add_post("/extras/tokenize/count", count_tokens_llama_cpp_python)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_get("/sim/requests", _requests)
    return app


async def run_simulator(host: str, port: int, settings: SimulatorSettings) -> None:
    """Serve the simulator on ``host:port`` until cancelled."""
    # Hanging streams never finish by themselves, so shutdown must not wait the default minute for them.
    runner = web.AppRunner(create_simulator_app(settings), shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
