"""Codex CLI's own requests (recorded, tests/golden/codex/) through the gateway: over a `chat` upstream with the
`drop` policy, and over a `responses` upstream, both for a model Codex does not know (top-level tools) and one it
does (tools in an `additional_tools` input item, a free-form custom tool)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import load_settings
from tests.conftest import Gateway, serve_gateway
from tests.helpers import read_frames, sim_requests

GOLDEN = Path(__file__).parent / "golden" / "codex"
# The headers Codex sent that matter to a server (tests/golden/codex/request_headers.json has them all).
CODEX_HEADERS = {"Accept": "text/event-stream", "originator": "codex_exec", "Content-Type": "application/json"}


def recorded(name: str) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads((GOLDEN / f"{name}.json").read_bytes())
    return body


@pytest.fixture(params=["chat", "responses"])
async def codex_gateway(
    request: pytest.FixtureRequest, simulator_url: str, redis_server: str, key_prefix: str
) -> AsyncIterator[Gateway]:
    upstream: dict[str, Any] = {
        "name": "local",
        "kind": request.param,
        "base_url": f"{simulator_url}/v1",
        "max_retries": 0,
        "headers": {"x-sim-tag": key_prefix},
    }
    if request.param == "chat":
        upstream["unsupported"] = "drop"  # web_search, reasoning.summary: what Codex always sends
    settings = load_settings(storage={"url": redis_server, "key_prefix": key_prefix}, upstreams=[upstream])
    async with serve_gateway(settings) as served:
        served.extra.update(kind=request.param, simulator=simulator_url)
        yield served


async def _as_codex(gateway: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST the body as Codex does and read the stream to its end: the events' JSON."""
    async with gateway.http.post("/v1/responses", data=orjson.dumps(body), headers=CODEX_HEADERS) as reply:
        assert reply.status == 200, await reply.text()
        frames = await read_frames(reply)
    return [frame.data for frame in frames if frame.data is not None]


async def test_codex_first_turn_completes_and_calls_its_shell_tool(codex_gateway: Gateway, key_prefix: str) -> None:
    events = await _as_codex(codex_gateway, recorded("first_request"))
    assert events[-1]["type"] == "response.completed"
    final = events[-1]["response"]
    (call,) = [item for item in final["output"] if item["type"] == "function_call"]
    assert call["name"] == "exec_command"  # the simulated model takes Codex's first function tool
    assert orjson.loads(call["arguments"])["cmd"]  # arguments valid for its schema
    if codex_gateway.extra["kind"] == "chat":
        assert final["metadata"]["dropped"] == "tools[8], reasoning.summary"
        sent = [body for body in await sim_requests(codex_gateway.extra["simulator"], key_prefix) if "stream" in body]
        names = [tool["function"]["name"] for tool in sent[-1]["tools"]]
        assert "multi_agent_v1__spawn_agent" in names  # the namespace, flattened


async def test_codex_function_call_loop_replayed(codex_gateway: Gateway) -> None:
    """The follow-up Codex sent after running the tool: the call and its output, in the input (store=false)."""
    events = await _as_codex(codex_gateway, recorded("tool_output_request"))
    assert events[-1]["type"] == "response.completed"
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message"]  # it answers now that the tool has run


@pytest.mark.parametrize("name", ["known_model_first_request", "known_model_tool_output_request"])
async def test_codex_with_a_model_it_knows(codex_gateway: Gateway, name: str) -> None:
    """For models in its catalogue Codex sends its tools as an `additional_tools` input item and calls a
    free-form custom tool: a chat upstream drops what it cannot take, a responses upstream gets it all."""
    events = await _as_codex(codex_gateway, recorded(name))
    assert events[-1]["type"] == "response.completed"
    if codex_gateway.extra["kind"] == "chat":
        assert "input[0]" in events[-1]["response"]["metadata"]["dropped"]  # the additional_tools item
