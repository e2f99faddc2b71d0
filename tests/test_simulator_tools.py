"""The simulator's function calls and structured outputs, driven by the official openai client, and the JSON-schema
value generator behind both."""

from __future__ import annotations

import datetime
import enum
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal

import openai
import pydantic
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib._pydantic import to_strict_json_schema
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam
from openai.types.responses import ResponseFunctionToolCall, ResponseInputItemParam

from simulator import SimulatorSettings, chat_input_text_of, create_simulator_app, input_text_of, simulated_text
from simulator.answers import ARGUMENT_PIECE_CHARS
from simulator.schema_values import schema_value
from tests.test_simulator import EVENT_ADAPTER, chat_frames, deltas, sse_events

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def server(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(create_simulator_app(SimulatorSettings(token_delay_ms=0, ttft_ms=0)))


@pytest.fixture
async def client(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http(server: TestServer) -> AsyncIterator[ClientSession]:
    async with ClientSession(base_url=server.make_url("/")) as session:
        yield session


# --- a small JSON-schema checker (jsonschema is not installed), for the subset the generator covers ---


def schema_errors(value: Any, schema: Any, root: Mapping[str, Any] | None = None, path: str = "$") -> list[str]:
    """Why ``value`` does not satisfy ``schema``; empty when it does."""
    root = root if root is not None else schema
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: nothing is allowed"]
    assert isinstance(schema, Mapping), schema
    if "$ref" in schema:
        target: Any = root
        for token in schema["$ref"].removeprefix("#/").split("/"):
            target = target[token]
        rest = {key: val for key, val in schema.items() if key != "$ref"}
        return schema_errors(value, target, root, path) + schema_errors(value, rest, root, path)
    errors: list[str] = []
    for part in schema.get("allOf", []):
        errors += schema_errors(value, part, root, path)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            passing = [branch for branch in schema[key] if not schema_errors(value, branch, root, path)]
            if not passing or (key == "oneOf" and len(passing) > 1):
                errors.append(f"{path}: {len(passing)} of the {key} branches match {value!r}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not the const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']!r}")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_is_json_type(value, kind) for kind in kinds):
            return [*errors, f"{path}: {value!r} is not of type {kinds}"]
    if isinstance(value, dict):
        errors += _object_errors(value, schema, root, path)
    elif isinstance(value, list):
        errors += _array_errors(value, schema, root, path)
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errors.append(f"{path}: length of {value!r} out of bounds")
        errors += _format_errors(value, schema.get("format"), path)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            errors.append(f"{path}: {value} out of [minimum, maximum]")
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            errors.append(f"{path}: {value} out of the exclusive bounds")
        step = schema.get("multipleOf")
        if step is not None and not (value / step).is_integer():
            errors.append(f"{path}: {value} is not a multiple of {step}")
    return errors


def _is_json_type(value: Any, kind: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[kind]


def _object_errors(value: dict[str, Any], schema: Mapping[str, Any], root: Any, path: str) -> list[str]:
    errors = [f"{path}: missing {name!r}" for name in schema.get("required", []) if name not in value]
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            errors += schema_errors(item, properties[name], root, f"{path}.{name}")
        elif extra is False:
            errors.append(f"{path}: {name!r} is not allowed")
        elif isinstance(extra, Mapping):
            errors += schema_errors(item, extra, root, f"{path}.{name}")
    if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", math.inf):
        errors.append(f"{path}: {len(value)} properties out of bounds")
    return errors


def _array_errors(value: list[Any], schema: Mapping[str, Any], root: Any, path: str) -> list[str]:
    errors = []
    prefix = schema.get("prefixItems", [])
    for index, item in enumerate(value):
        item_schema = prefix[index] if index < len(prefix) else schema.get("items", {})
        errors += schema_errors(item, item_schema, root, f"{path}[{index}]")
    if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
        errors.append(f"{path}: {len(value)} items out of bounds")
    if schema.get("uniqueItems") and len({json.dumps(item, sort_keys=True) for item in value}) < len(value):
        errors.append(f"{path}: items are not unique")
    return errors


_FORMAT_PATTERNS = {"email": r"[^@\s]+@[^@\s]+\.[a-z]+", "uri": r"https://\S+"}


def _format_errors(value: str, fmt: Any, path: str) -> list[str]:
    try:
        if fmt == "date-time":
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif fmt == "date":
            datetime.date.fromisoformat(value)
        elif fmt == "uuid":
            uuid.UUID(value)
        elif fmt in _FORMAT_PATTERNS and not re.fullmatch(_FORMAT_PATTERNS[fmt], value):
            raise ValueError(value)
    except ValueError:
        return [f"{path}: {value!r} is not a {fmt}"]
    return []


def test_the_checker_catches_what_it_should() -> None:
    # The checker guards every other test here, so it must itself be able to say no.
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n", "m"]}
    assert schema_errors({"n": 5}, schema) == ["$: missing 'm'", "$.n: 5 out of [minimum, maximum]"]
    closed = {**schema, "required": ["n"], "additionalProperties": False}
    assert schema_errors({"n": 1, "x": 1}, closed) == ["$: 'x' is not allowed"]
    assert schema_errors("c", {"enum": ["a", "b"]}) == ["$: 'c' not in ['a', 'b']"]
    assert schema_errors(True, {"type": "integer"})  # a boolean is no integer
    assert schema_errors("x", {"type": "string", "format": "date-time"})


# --- schema_value ---

ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 12, "maxLength": 14},
        "kind": {"type": "string", "enum": ["book", "film", "game"]},
        "version": {"const": 3},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "count": {"type": "integer", "minimum": 10, "maximum": 40, "multipleOf": 7},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2, "uniqueItems": True},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
        "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "contact": {"type": "string", "format": "email"},
        "maybe": {"type": ["integer", "null"]},
        "either": {"anyOf": [{"type": "string", "format": "date"}, {"type": "integer"}]},
        "owner": {"$ref": "#/$defs/Person"},
        "extras": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 100}},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    },
    "required": ["name", "kind", "version", "score", "count", "flags", "owner"],
    "additionalProperties": False,
    "$defs": {
        "Person": {
            "type": "object",
            "properties": {"first": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
            "required": ["first", "age"],
            "additionalProperties": False,
        }
    },
}


def test_schema_value_is_valid_for_every_keyword_it_covers() -> None:
    value = schema_value(ITEM_SCHEMA, "seed")
    assert schema_errors(value, ITEM_SCHEMA) == []
    assert set(value) == set(ITEM_SCHEMA["properties"])  # optional properties are filled in too
    assert value["version"] == 3
    assert value["count"] in (14, 21, 28, 35)
    assert sorted(value["flags"]) == [False, True]
    assert len(value["tags"]) == 3
    assert value["extras"]
    assert all(number >= 100 for number in value["extras"].values())
    assert isinstance(value["maybe"], int)  # a nullable type still gets a real value
    assert isinstance(value["either"], str)  # anyOf: the first branch
    assert [type(item) for item in value["pair"]] == [int, str]


def test_schema_value_is_deterministic_per_seed() -> None:
    assert schema_value(ITEM_SCHEMA, "seed") == schema_value(ITEM_SCHEMA, "seed")
    values = {json.dumps(schema_value(ITEM_SCHEMA, f"seed {n}"), sort_keys=True) for n in range(5)}
    assert len(values) > 1


def test_schema_value_ends_recursive_schemas() -> None:
    tree = {
        "$ref": "#/$defs/Node",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                    "parent": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
                },
                "required": ["label", "children", "parent"],
                "additionalProperties": False,
            }
        },
    }
    value = schema_value(tree, "x")
    assert schema_errors(value, tree) == []
    assert value["children"]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Cat(pydantic.BaseModel):
    pet: Literal["cat"]
    lives: Annotated[int, pydantic.Field(ge=1, le=9)]


class Dog(pydantic.BaseModel):
    pet: Literal["dog"]
    good: bool


class Tree(pydantic.BaseModel):
    name: Annotated[str, pydantic.Field(min_length=3, max_length=5)]
    children: list[Tree]


class Everything(pydantic.BaseModel):
    title: str
    color: Color
    ratio: Annotated[float, pydantic.Field(gt=0, lt=1)]
    step: Annotated[int, pydantic.Field(multiple_of=5, ge=10, le=30)]
    born: datetime.date
    seen: datetime.datetime
    key: uuid.UUID
    scores: dict[str, int]
    point: tuple[int, str]
    unique: set[int]
    pet: Annotated[Cat | Dog, pydantic.Field(discriminator="pet")]
    tree: Tree
    note: str | None = None


@pytest.mark.parametrize("strict", [False, True], ids=["pydantic", "sdk-strict"])
def test_schema_value_satisfies_pydantic_models(strict: bool) -> None:
    # Pydantic's schemas use $defs, $ref, anyOf, oneOf with a discriminator, prefixItems and formats; the SDK's strict
    # form (what parse() sends) also makes every property required and forbids extras.
    schema = to_strict_json_schema(Everything) if strict else Everything.model_json_schema()
    for seed in ("a", "b", "c"):
        value = schema_value(schema, seed)
        assert schema_errors(value, schema) == []
        parsed = Everything.model_validate_json(json.dumps(value))
        assert 0 < parsed.ratio < 1
        assert parsed.step in (10, 15, 20, 25, 30)


_LEAVES = st.one_of(
    st.builds(
        lambda low, span: {"type": "integer", "minimum": low, "maximum": low + span},
        st.integers(-50, 50),
        st.integers(0, 9),
    ),
    st.builds(
        lambda low, span, step: {"type": "integer", "minimum": low, "maximum": low + span + step, "multipleOf": step},
        st.integers(-50, 50),
        st.integers(0, 20),
        st.integers(1, 6),
    ),
    st.builds(
        lambda low, span: {"type": "number", "exclusiveMinimum": low, "exclusiveMaximum": low + span},
        st.integers(-50, 50),
        st.integers(1, 30),
    ),
    st.builds(
        lambda low, span: {"type": "string", "minLength": low, "maxLength": low + span},
        st.integers(0, 30),
        st.integers(0, 5),
    ),
    st.sampled_from(["date-time", "date", "uuid", "email", "uri"]).map(lambda f: {"type": "string", "format": f}),
    st.lists(st.text(max_size=3) | st.integers(), min_size=1, max_size=4).map(lambda values: {"enum": values}),
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"const": "fixed"}, {}, {"type": ["string", "null"]}]),
)


def _containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.builds(
        lambda properties, required_mask, closed: {
            "type": "object",
            "properties": properties,
            "required": [name for name, keep in zip(properties, required_mask, strict=False) if keep],
            "additionalProperties": not closed,
        },
        st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children, max_size=4),
        st.lists(st.booleans(), min_size=4, max_size=4),
        st.booleans(),
    )
    maps = children.map(lambda child: {"type": "object", "additionalProperties": child})
    arrays = st.builds(
        lambda items, low, span: {"type": "array", "items": items, "minItems": low, "maxItems": low + span},
        children,
        st.integers(0, 3),
        st.integers(0, 3),
    )
    unions = st.lists(children, min_size=1, max_size=3).map(lambda branches: {"anyOf": branches})
    return objects | maps | arrays | unions


@settings(max_examples=300, deadline=None)
@given(schema=st.recursive(_LEAVES, _containers, max_leaves=12), seed=st.text(max_size=8))
def test_schema_value_is_valid_for_generated_schemas(schema: dict[str, Any], seed: str) -> None:
    assert schema_errors(schema_value(schema, seed), schema) == []


# --- function calls ---

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "unit", "days", "hourly", "where"],
    "additionalProperties": False,
}
RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS, "strict": True},
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}, "strict": False},
]
CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}}
    for tool in RESPONSES_TOOLS
]
QUESTION = "What is the weather in Paris?"


def the_call(output: list[Any]) -> ResponseFunctionToolCall:
    assert len(output) == 1
    (call,) = output
    assert isinstance(call, ResponseFunctionToolCall)
    assert call.id is not None
    assert call.id.startswith("fc_")
    assert call.call_id.startswith("call_")
    assert call.status == "completed"
    return call


def answered(call: ResponseFunctionToolCall, output: str = "sunny") -> list[ResponseInputItemParam]:
    """The next turn's input: the question, the call, and its output."""
    return [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": output},
    ]


async def test_responses_call_a_tool_once_then_answer_after_its_output(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="sim-1", input=QUESTION, tools=RESPONSES_TOOLS)
    assert response.status == "completed"
    assert response.output_text == ""
    call = the_call(response.output)
    assert call.name == "get_weather"
    arguments = json.loads(call.arguments)
    assert schema_errors(arguments, WEATHER_PARAMETERS) == []
    assert response.usage is not None
    assert response.usage.output_tokens == math.ceil(len(call.arguments) / ARGUMENT_PIECE_CHARS)
    assert [tool.type for tool in response.tools] == ["function", "function"]  # echoed as sent

    again = await client.responses.create(model="sim-1", input=QUESTION, tools=RESPONSES_TOOLS)
    assert the_call(again.output).arguments == call.arguments  # deterministic, like the text
    assert the_call(again.output).call_id != call.call_id

    follow_up = answered(call)
    answer = await client.responses.create(model="sim-1", input=follow_up, tools=RESPONSES_TOOLS)
    assert answer.status == "completed"
    assert [item.type for item in answer.output] == ["message"]
    assert answer.output_text == "".join(simulated_text(input_text_of({"input": follow_up}), 20))


async def test_responses_function_call_streams_as_openai_streams_it(http: ClientSession) -> None:
    events = await sse_events(http, {"model": "sim-1", "input": QUESTION, "tools": RESPONSES_TOOLS})
    for event in events:
        # Validated (every required field present), and with no field the SDK's models do not declare.
        parsed = EVENT_ADAPTER.validate_python(event)
        assert not parsed.model_extra, event
        item = getattr(parsed, "item", None)
        assert item is None or not item.model_extra, event
    kinds = [event["type"] for event in events]
    argument_deltas = [event for event in events if event["type"] == "response.function_call_arguments.delta"]
    assert len(argument_deltas) >= 3
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(argument_deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    added, done_item = events[2]["item"], events[-2]["item"]
    assert added == {
        "id": added["id"],
        "type": "function_call",
        "status": "in_progress",
        "call_id": added["call_id"],
        "name": "get_weather",
        "arguments": "",
    }
    assert added["id"].startswith("fc_")
    arguments = "".join(delta["delta"] for delta in argument_deltas)
    assert {(delta["item_id"], delta["output_index"]) for delta in argument_deltas} == {(added["id"], 0)}
    assert events[-3]["arguments"] == arguments
    assert events[-3]["item_id"] == added["id"]
    assert done_item == {**added, "status": "completed", "arguments": arguments}
    assert events[-1]["response"]["output"] == [done_item]
    assert schema_errors(json.loads(arguments), WEATHER_PARAMETERS) == []


async def test_sdk_stream_accumulates_the_call_and_then_the_answer(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="sim-1", input=QUESTION, tools=RESPONSES_TOOLS) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    call = the_call(final.output)
    assert schema_errors(json.loads(call.arguments), WEATHER_PARAMETERS) == []

    async with client.responses.stream(model="sim-1", input=answered(call), tools=RESPONSES_TOOLS) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "".join(simulated_text(input_text_of({"input": answered(call)}), 20))


class Forecast(pydantic.BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: Annotated[int, pydantic.Field(ge=1, le=7)]
    hourly: bool


async def test_responses_parse_validates_the_arguments_as_the_tools_model(client: openai.AsyncOpenAI) -> None:
    parsed = await client.responses.parse(
        model="sim-1", input=QUESTION, tools=[openai.pydantic_responses_function_tool(Forecast)]
    )
    (call,) = parsed.output
    assert call.type == "function_call"
    assert isinstance(call.parsed_arguments, Forecast)
    assert 1 <= call.parsed_arguments.days <= 7


@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        ("auto", "get_weather"),
        ("required", "get_weather"),
        ({"type": "function", "name": "get_time"}, "get_time"),
        (
            {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
            "get_time",
        ),
        ("none", None),
    ],
)
async def test_responses_tool_choice_picks_the_call(
    client: openai.AsyncOpenAI, tool_choice: Any, called: str | None
) -> None:
    response = await client.responses.create(
        model="sim-1", input=QUESTION, tools=RESPONSES_TOOLS, tool_choice=tool_choice
    )
    if called is None:
        assert response.output_text == "".join(simulated_text(QUESTION, 20))
    else:
        assert the_call(response.output).name == called
    echoed = response.tool_choice  # as sent, as OpenAI echoes it
    assert (echoed if isinstance(echoed, str) else echoed.type) == (
        tool_choice if isinstance(tool_choice, str) else tool_choice["type"]
    )


async def test_responses_tool_choice_naming_a_missing_tool_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(
            model="sim-1", input=QUESTION, tools=RESPONSES_TOOLS, tool_choice={"type": "function", "name": "nope"}
        )
    assert caught.value.param == "tool_choice"


async def test_responses_a_history_with_a_call_gets_text(client: openai.AsyncOpenAI) -> None:
    # A call already in the history (even one never answered, as some gateway tests send) means the model has had
    # its turn with tools; calling again would keep an agent loop going forever.
    history: list[ResponseInputItemParam] = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_weather", "name": "get_weather", "arguments": "{}"},
    ]
    response = await client.responses.create(model="sim-1", input=history, tools=RESPONSES_TOOLS)
    assert response.output_text == "".join(simulated_text("weather?", 20))
    hosted = await client.responses.create(model="sim-1", input=QUESTION, tools=[{"type": "web_search"}])
    assert hosted.output_text == "".join(simulated_text(QUESTION, 20))  # only function tools can be simulated


async def test_responses_error_event_fails_a_call_after_its_first_piece(http: ClientSession) -> None:
    body = {"model": "sim-1", "input": QUESTION, "tools": RESPONSES_TOOLS, "metadata": {"sim_fault": "error_event"}}
    events = await sse_events(http, body)
    assert [event["type"] for event in events][2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "error",
        "response.failed",
    ]
    (partial,) = events[-1]["response"]["output"]
    assert partial["status"] == "incomplete"
    assert partial["arguments"] == events[3]["delta"]


async def test_chat_call_a_tool_once_then_answer_after_its_output(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    completion = await client.chat.completions.create(model="sim-1", messages=messages, tools=CHAT_TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert schema_errors(json.loads(call.function.arguments), WEATHER_PARAMETERS) == []

    # The same conversation gets the same arguments on both endpoints, so a gateway translating one to the other
    # sees identical calls.
    response = await client.responses.create(
        model="sim-1", input=[{"role": "user", "content": QUESTION}], tools=RESPONSES_TOOLS
    )
    assert the_call(response.output).arguments == call.function.arguments

    follow_up: list[ChatCompletionMessageParam] = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answer = await client.chat.completions.create(model="sim-1", messages=follow_up, tools=CHAT_TOOLS)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "".join(simulated_text(chat_input_text_of({"messages": follow_up}), 20))


async def test_chat_call_streams_in_pieces(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    body = {"model": "sim-1", "messages": [{"role": "user", "content": QUESTION}], "tools": CHAT_TOOLS}
    chunks, done = await chat_frames(http, body)
    assert done
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    calls = [call for part in deltas(chunks, "tool_calls") for call in part]
    assert len(calls) >= 3
    assert {call["index"] for call in calls} == {0}
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert schema_errors(json.loads(arguments), WEATHER_PARAMETERS) == []
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    async with client.chat.completions.stream(
        model="sim-1", messages=[{"role": "user", "content": QUESTION}], tools=[openai.pydantic_function_tool(Forecast)]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    (tool_call,) = final.choices[0].message.tool_calls or []
    assert isinstance(tool_call.function.parsed_arguments, Forecast)


@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
        (
            {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "get_time"}}]},
            },
            "get_time",
        ),
        ("none", None),
    ],
)
async def test_chat_tool_choice_picks_the_call(
    client: openai.AsyncOpenAI, tool_choice: Any, called: str | None
) -> None:
    completion = await client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": QUESTION}], tools=CHAT_TOOLS, tool_choice=tool_choice
    )
    calls = completion.choices[0].message.tool_calls
    if called is None:
        assert calls is None
        assert completion.choices[0].message.content == "".join(simulated_text(QUESTION, 20))
    else:
        assert calls is not None
        assert [call.function.name for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)] == [
            called
        ]


async def test_chat_sim_tool_calls_knob_overrides_the_default(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    text = await client.chat.completions.create(
        model="sim-1", messages=messages, tools=CHAT_TOOLS, extra_body={"metadata": {"sim_tool_calls": "0"}}
    )
    assert text.choices[0].message.content == "".join(simulated_text(QUESTION, 20))
    two = await client.chat.completions.create(
        model="sim-1", messages=messages, tools=CHAT_TOOLS, extra_headers={"x-sim-tool-calls": "2"}
    )
    calls = two.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)] == [
        "get_weather",
        "get_time",
    ]


# --- structured outputs ---


class Person(pydantic.BaseModel):
    name: str
    age: Annotated[int, pydantic.Field(ge=0, le=130)]
    email: Annotated[str, pydantic.Field(json_schema_extra={"format": "email"})]
    tags: list[str]
    role: Literal["admin", "user"]
    manager: Person | None


async def test_responses_parse_returns_the_model(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    parsed = await client.responses.parse(model="sim-1", input="Who is it?", text_format=Person)
    assert parsed.status == "completed"
    person = parsed.output_parsed
    assert isinstance(person, Person)
    assert 0 <= person.age <= 130
    assert json.loads(parsed.output_text) == person.model_dump(mode="json")
    assert parsed.text is not None
    assert parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"  # echoed

    # It still streams in pieces, and the SDK's accumulator parses it too.
    body = {
        "model": "sim-1",
        "input": "Who is it?",
        "text": {
            "format": {"type": "json_schema", "name": "person", "schema": to_strict_json_schema(Person), "strict": True}
        },
    }
    events = await sse_events(http, body)
    text_deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert len(text_deltas) > 3
    assert json.loads("".join(text_deltas)) == json.loads(parsed.output_text)
    async with client.responses.stream(model="sim-1", input="Who is it?", text_format=Person) as stream:
        final = await stream.get_final_response()
    assert final.output_parsed == person


async def test_chat_parse_returns_the_model(client: openai.AsyncOpenAI, http: ClientSession) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Who is it?"}]
    completion = await client.chat.completions.parse(model="sim-1", messages=messages, response_format=Person)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert completion.choices[0].finish_reason == "stop"
    # The same conversation, the same value, whichever API asked.
    response = await client.responses.parse(
        model="sim-1", input=[{"role": "user", "content": "Who is it?"}], text_format=Person
    )
    assert response.output_parsed == person

    async with client.chat.completions.stream(model="sim-1", messages=messages, response_format=Person) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == person
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": to_strict_json_schema(Person), "strict": True},
    }
    chunks, _ = await chat_frames(http, {"model": "sim-1", "messages": messages, "response_format": schema_format})
    assert len(deltas(chunks, "content")) > 3


async def test_json_object_answers_the_usual_text_as_json(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="sim-1", input="Hi", text={"format": {"type": "json_object"}})
    assert json.loads(response.output_text) == {"answer": "".join(simulated_text("Hi", 20))}
    completion = await client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "Hi"}], response_format={"type": "json_object"}
    )
    assert completion.choices[0].message.content == response.output_text


async def test_a_cap_cuts_json_short_as_it_cuts_text(client: openai.AsyncOpenAI) -> None:
    full = await client.responses.create(model="sim-1", input="Hi", text={"format": {"type": "json_object"}})
    capped = await client.responses.create(
        model="sim-1", input="Hi", text={"format": {"type": "json_object"}}, max_output_tokens=3
    )
    assert capped.status == "incomplete"
    assert capped.output_text == full.output_text[: 3 * ARGUMENT_PIECE_CHARS]
    chat = await client.chat.completions.create(
        model="sim-1",
        messages=[{"role": "user", "content": "Hi"}],
        response_format={"type": "json_object"},
        max_tokens=3,
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.content == capped.output_text


async def test_a_json_schema_format_without_a_schema_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="sim-1", input="Hi", text={"format": {"type": "json_schema", "name": "x"}})  # type: ignore[typeddict-item]
    assert caught.value.param == "text.format.schema"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="sim-1",
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
    assert caught.value.param == "response_format.json_schema.schema"
