"""Conversations and previous_response_id: state the gateway owns, over both kinds of upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.config import load_settings
from simulator import simulated_text
from tests.conftest import Gateway, GatewayProcess, serve_gateway
from tests.helpers import keys_with_prefix, read_frames, sdk_for, sim_requests

KINDS = ["responses", "chat"]


def texts_sent(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of everything a model was sent, whichever API it speaks."""
    if "messages" in body:
        return [(m["role"], m["content"] if isinstance(m["content"], str) else "") for m in body["messages"]]
    sent = []
    if body.get("instructions"):
        sent.append(("system", body["instructions"]))
    for item in body["input"] if isinstance(body["input"], list) else [{"role": "user", "content": body["input"]}]:
        content = item["content"]
        text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
        sent.append((item["role"], text))
    return sent


def answer_to(sent: list[tuple[str, str]], tokens: int = 20) -> str:
    """What the simulator answers a model input with (its seed is every text, one per line)."""
    return "".join(simulated_text("\n".join(text for _, text in sent), tokens))


@pytest.fixture(params=KINDS)
async def gateway_of_kind(
    request: pytest.FixtureRequest, simulator_url: str, storage_url: str, key_prefix: str
) -> AsyncIterator[Gateway]:
    settings = load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix},
        upstreams=[
            {
                "name": "sim",
                "kind": request.param,
                "base_url": f"{simulator_url}/v1",
                "max_retries": 0,
                "send_metadata": True,  # the simulator reads its knobs from metadata
            }
        ],
    )
    async with serve_gateway(settings) as gateway:
        yield gateway


async def test_three_turns_with_previous_response_id(
    gateway_of_kind: Gateway, simulator_url: str, key_prefix: str
) -> None:
    client = gateway_of_kind.client
    meta = {"sim_tag": key_prefix}
    first = await client.responses.create(model="sim-1", input="Hi, I am Ada.", instructions="Be kind.", metadata=meta)
    second = await client.responses.create(
        model="sim-1", input="What is my name?", previous_response_id=first.id, metadata=meta
    )
    third = await client.responses.create(
        model="sim-1", input=[{"role": "user", "content": "Thanks."}], previous_response_id=second.id, metadata=meta
    )
    bodies = await sim_requests(simulator_url, key_prefix)
    assert len(bodies) == 3
    assert texts_sent(bodies[0]) == [("system", "Be kind."), ("user", "Hi, I am Ada.")]
    # Instructions are not carried over; the chain's inputs and outputs are, in order.
    assert texts_sent(bodies[1]) == [
        ("user", "Hi, I am Ada."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
    ]
    assert texts_sent(bodies[2]) == [
        ("user", "Hi, I am Ada."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
        ("assistant", second.output_text),
        ("user", "Thanks."),
    ]
    assert third.previous_response_id == second.id
    assert third.output_text == answer_to(texts_sent(bodies[2]))
    assert (await client.responses.input_items.list(third.id)).data[0].content[0].text == "Thanks."  # type: ignore[union-attr]


async def test_three_turns_in_a_conversation(gateway_of_kind: Gateway, simulator_url: str, key_prefix: str) -> None:
    client = gateway_of_kind.client
    meta = {"sim_tag": key_prefix}
    conversation = await client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}], metadata={"topic": "names"}
    )
    answers = []
    for turn, question in enumerate(["Hello?", "What is my name?", "Bye."]):
        response = await client.responses.create(
            model="sim-1",
            input=question,
            conversation=conversation.id if turn % 2 else {"id": conversation.id},
            metadata=meta,
        )
        assert response.conversation is not None
        assert response.conversation.id == conversation.id
        answers.append(response.output_text)
    bodies = await sim_requests(simulator_url, key_prefix)
    assert texts_sent(bodies[2]) == [
        ("user", "My name is Ada."),
        ("user", "Hello?"),
        ("assistant", answers[0]),
        ("user", "What is my name?"),
        ("assistant", answers[1]),
        ("user", "Bye."),
    ]
    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert [(item.role, item.content[0].text) for item in items] == [  # type: ignore[union-attr]
        ("user", "My name is Ada."),
        ("user", "Hello?"),
        ("assistant", answers[0]),
        ("user", "What is my name?"),
        ("assistant", answers[1]),
        ("user", "Bye."),
        ("assistant", answers[2]),
    ]


async def test_previous_response_id_rules(gateway: Gateway) -> None:
    client = gateway.client
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="sim-1", input="x", previous_response_id="resp_nothing")
    assert (missing.value.code, missing.value.param) == ("previous_response_not_found", "previous_response_id")
    unstored = await client.responses.create(model="sim-1", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="sim-1", input="x", previous_response_id=unstored.id)
    running = await client.responses.create(model="sim-1", input="x", background=True, metadata={"sim_fault": "hang"})
    with pytest.raises(openai.ConflictError) as busy:
        await client.responses.create(model="sim-1", input="x", previous_response_id=running.id)
    assert busy.value.code == "previous_response_in_progress"
    assert busy.value.response.headers["x-should-retry"] == "false"
    await client.responses.cancel(running.id)
    with pytest.raises(openai.BadRequestError) as cancelled:
        await client.responses.create(model="sim-1", input="x", previous_response_id=running.id)
    assert cancelled.value.code == "previous_response_not_completed"
    conversation = await client.conversations.create()
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(
            model="sim-1", input="x", previous_response_id=unstored.id, conversation=conversation.id
        )
    with pytest.raises(openai.NotFoundError) as no_conversation:
        await client.responses.create(model="sim-1", input="x", conversation="conv_nothing")
    assert no_conversation.value.param == "conversation"


async def test_completed_and_incomplete_turns_join_the_conversation_failed_ones_do_not(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    client = gateway.client
    conversation = await client.conversations.create(items=[{"role": "user", "content": "start"}])
    failed = await client.responses.create(
        model="sim-1", input="this fails", conversation=conversation.id, metadata={"sim_fault": "error_event"}
    )
    assert failed.status == "failed"
    incomplete = await client.responses.create(
        model="sim-1", input="this is cut", conversation=conversation.id, max_output_tokens=16
    )
    assert incomplete.status == "incomplete"
    assert incomplete.output_text  # a part of the answer
    unstored = await client.responses.create(
        model="sim-1", input="not stored", conversation=conversation.id, store=False
    )
    assert unstored.status == "completed"
    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    # The user's input and the answer so far are kept, as OpenAI keeps them: the next turn continues from there.
    assert [item.content[0].text for item in items] == [  # type: ignore[union-attr]
        "start",
        "this is cut",
        incomplete.output_text,
    ]
    # The turn lock was released each time: a completed turn still goes through.
    done = await client.responses.create(
        model="sim-1", input="works", conversation=conversation.id, metadata={"sim_tag": key_prefix}
    )
    assert done.status == "completed"
    assert texts_sent((await sim_requests(simulator_url, key_prefix))[-1]) == [
        ("user", "start"),
        ("user", "this is cut"),
        ("assistant", incomplete.output_text),
        ("user", "works"),
    ]


async def test_an_incomplete_response_is_continued_by_previous_response_id(
    gateway: Gateway, simulator_url: str, key_prefix: str
) -> None:
    client = gateway.client
    cut = await client.responses.create(model="sim-1", input="a long answer", max_output_tokens=16)
    assert (cut.status, cut.incomplete_details and cut.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    going_on = await client.responses.create(
        model="sim-1", input="go on", previous_response_id=cut.id, metadata={"sim_tag": key_prefix}
    )
    assert going_on.status == "completed"
    assert texts_sent((await sim_requests(simulator_url, key_prefix))[-1]) == [
        ("user", "a long answer"),
        ("assistant", cut.output_text),
        ("user", "go on"),
    ]


async def test_conversation_crud_and_pagination(gateway: Gateway) -> None:
    client = gateway.client
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.conversations.create(items=[{"role": "user", "content": str(n)} for n in range(21)])
    assert too_many.value.param == "items"
    odd: Any = [{"role": "user", "content": "hi", "id": {"a": 1}}]
    with pytest.raises(openai.BadRequestError) as odd_id:
        await client.conversations.create(items=odd)
    assert odd_id.value.param == "items[0].id"
    conversation = await client.conversations.create(
        items=[{"role": "user", "content": f"item {n}"} for n in range(20)], metadata={"a": "1"}
    )
    assert conversation.object == "conversation"
    assert conversation.metadata == {"a": "1"}
    added = await client.conversations.items.create(
        conversation.id, items=[{"role": "assistant", "content": f"item {n}"} for n in range(20, 25)]
    )
    assert [item.content[0].text for item in added.data] == [f"item {n}" for n in range(20, 25)]  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as odd_type:
        await client.conversations.items.create(conversation.id, items=[{"type": {"a": 1}}])  # type: ignore[list-item]
    assert odd_type.value.param == "items[0].type"
    ascending = [item async for item in client.conversations.items.list(conversation.id, order="asc", limit=4)]
    assert [item.content[0].text for item in ascending] == [f"item {n}" for n in range(25)]  # type: ignore[union-attr]
    descending = [item async for item in client.conversations.items.list(conversation.id, limit=7)]
    assert [item.id for item in descending] == [item.id for item in reversed(ascending)]
    page = await client.conversations.items.list(conversation.id, limit=10)
    assert (page.has_more, page.first_id, page.last_id) == (True, descending[0].id, descending[9].id)

    one = await client.conversations.items.retrieve(ascending[3].id, conversation_id=conversation.id)
    assert one.id == ascending[3].id
    after_delete = await client.conversations.items.delete(ascending[3].id, conversation_id=conversation.id)
    assert after_delete.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.retrieve(ascending[3].id, conversation_id=conversation.id)
    assert len([item async for item in client.conversations.items.list(conversation.id)]) == 24

    updated = await client.conversations.update(conversation.id, metadata={"b": "2"})
    assert updated.metadata == {"b": "2"}
    assert (await client.conversations.retrieve(conversation.id)).metadata == {"b": "2"}
    deleted = await client.conversations.delete(conversation.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (conversation.id, True, "conversation.deleted")
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.list(conversation.id)


async def test_deleting_a_conversation_removes_all_its_keys(
    redis_gateway: Gateway, key_prefix: str, shared_redis_client: aioredis.Redis | RedisCluster
) -> None:
    client = redis_gateway.client
    conversation = await client.conversations.create(items=[{"role": "user", "content": "hello"}])
    await client.responses.create(model="sim-1", input="turn", conversation=conversation.id)
    assert any(conversation.id.encode() in key for key in await keys_with_prefix(shared_redis_client, key_prefix))
    await client.conversations.delete(conversation.id)
    assert not any(conversation.id.encode() in key for key in await keys_with_prefix(shared_redis_client, key_prefix))


async def test_two_instances_racing_a_turn_start_exactly_one(
    two_gateways: tuple[GatewayProcess, GatewayProcess], simulator_url: str, key_prefix: str
) -> None:
    """Done-when: two instances racing a turn on one conversation: exactly one starts, the other gets 409."""
    clients = [sdk_for(gateway.url) for gateway in two_gateways]
    try:
        conversation = await clients[0].conversations.create()
        results = await asyncio.gather(
            *(
                client.responses.create(
                    model="sim-1",
                    input="race",
                    conversation=conversation.id,
                    background=True,
                    metadata={"sim_tag": key_prefix, "sim_token_delay_ms": "30"},
                )
                for client in clients
                for _ in range(3)
            ),
            return_exceptions=True,
        )
    finally:
        for client in clients:
            await client.close()
    started = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, BaseException)]
    assert len(started) == 1
    assert len(refused) == 5
    for error in refused:
        assert isinstance(error, openai.ConflictError)
        assert error.code == "conversation_busy"
        assert started[0].id in error.message
        assert error.response.headers["x-should-retry"] == "false"
    assert len(await sim_requests(simulator_url, key_prefix)) <= 1


async def test_reattach_by_conversation_from_the_other_instance(
    two_gateways: tuple[GatewayProcess, GatewayProcess], key_prefix: str
) -> None:
    """Done-when: reattach by conversation mid-run from the other instance yields the full stream."""
    a, b = two_gateways
    client_a = sdk_for(a.url)
    try:
        conversation = await client_a.conversations.create()
        created = await client_a.responses.create(
            model="sim-1",
            input="long turn",
            conversation=conversation.id,
            background=True,
            metadata={"sim_token_delay_ms": "40"},
        )
        async with aiohttp.ClientSession() as http:
            path = f"/v1/conversations/{conversation.id}/active_response"
            async with http.get(f"{b.url}{path}") as reply:
                assert reply.status == 200
                assert (await reply.json())["id"] == created.id
            async with http.get(f"{b.url}{path}", params={"stream": "true"}) as reply:
                by_conversation = await read_frames(reply)
            async with http.get(f"{a.url}/v1/responses/{created.id}", params={"stream": "true"}) as reply:
                by_id = await read_frames(reply)
            async with http.get(f"{b.url}{path}") as reply:
                assert reply.status == 404  # the turn is over: nothing is running
    finally:
        await client_a.close()
    assert by_conversation[0].event == "response.created"
    assert by_conversation[-1].event == "response.completed"
    assert [frame.raw for frame in by_conversation] == [frame.raw for frame in by_id]
