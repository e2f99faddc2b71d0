"""Every HTTP route driven with hostile input by hypothesis, auth on, two tenants with real ids of each: SDK-shaped
bodies mutated (fields dropped, wrong types, junk, huge or control-character strings), raw bytes, hostile headers
and cursors. For every request: never a 5xx, every 4xx the OpenAI envelope as JSON, never another tenant's object,
and a refusal stores nothing (no Redis key under the test's prefix created, changed or removed) and sends nothing
upstream (the test's own simulator counts every call).

Bounded to about a minute by default, derandomized and without an example database so CI runs the same examples;
`FUZZ_EXAMPLES=N` runs N random examples instead (`make test-fuzz`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.config import Settings
from gateway.state import STORE
from storage.memory import MemoryStore
from tests.conftest import Gateway, serve_gateway, simulator_process
from tests.helpers import keys_with_prefix, sim_stats
from tests.lifecycle_checks import real_store
from tests.test_hostile_input import KEY_A, KEY_B, two_tenant_settings

T = TypeVar("T")

LONG_MODE_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
# About half a minute for both backends in `make test`, which must stay well within CI's 15 minutes (the embedded
# store's examples are the cheaper); `make test-fuzz` runs thousands.
EXAMPLES = {
    "redis": LONG_MODE_EXAMPLES or 200,
    "memory": LONG_MODE_EXAMPLES or 150,
}
REQUEST_TIMEOUT_SECONDS = 20.0
QUIET_TIMEOUT_SECONDS = 20.0
# A stream the gateway answers 200 is read this far, then cut (the client going away is legitimate).
STREAM_READ_BYTES = 256 * 1024
STREAM_READ_SECONDS = 5.0
# Each id or value in a URL is cut to this many characters: a request line over aiohttp's 8,190 bytes is refused
# at the protocol level, which is tested on its own.
URL_PART_CHARS = 600
ENVELOPE_KEYS = {"message", "type", "param", "code"}
TENANTS = ("a", "b")
KEYS = {"a": KEY_A, "b": KEY_B}


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each as often as its weight says (st.one_of flattens nested one_ofs, so repeating
    a strategy in it does not weigh it)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


# --- values -------------------------------------------------------------------------------------------------

# Text a client may put where a string goes: any code point but surrogates (JSON cannot carry them as UTF-8),
# control characters included.
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
HUGE_TEXT = st.sampled_from([1_000, 70_000, 300_000]).map(lambda n: "x" * n)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, ANY_TEXT)
JUNK = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for index in range(depth):
        value = [value] if index % 2 else {"a": value}
    return value


HOSTILE = st.one_of(
    JUNK,
    HUGE_TEXT,
    st.sampled_from([60, 63, 64, 65, 70, 300]).map(deep),
    st.sampled_from(["resp_" + "a" * 5000, "msg_" + "0" * 300, "conv_\u0000", "\u202e", "", " ", "null"]),
)

# Cursors and numbers as query strings: what int() takes and a stream id does not, and worse.
CURSOR_LIKE = st.sampled_from(
    [
        "0",
        "1",
        "2",
        "-1",
        "+5",
        "1_0",
        " 5",
        "5 ",
        "\u00b2",
        "\u0663",
        "\uff11",
        "1e3",
        "0x10",
        "3.0",
        "",
        "9" * 18,
        "9" * 19,
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775808",
        "9" * 5000,
        "nan",
        "true",
    ]
)
HOSTILE_NUMBERS = weighted(
    (3, CURSOR_LIKE), (1, st.integers(min_value=-(2**80), max_value=2**80).map(str)), (1, ANY_TEXT)
)

# --- ids ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """An id chosen by the strategy and resolved when the example runs (objects are deleted and replaced between
    examples): a real object of a tenant (`kind`, `owner`, `index`), optionally mutated, or a literal."""

    kind: str  # "response" | "conversation" | "item" | "input_item" | "literal"
    owner: str = "a"
    index: int = 0
    literal: str = ""
    mutation: str = "none"


def mutate_id(value: str, mutation: str) -> str:
    if mutation == "append":
        return value + "x"
    if mutation == "truncate":
        return value[:-1]
    if mutation == "upper":
        return value.upper()
    if mutation == "swap_prefix":
        prefix, _, rest = value.partition("_")
        other = {"resp": "conv", "conv": "resp", "msg": "resp"}.get(prefix, "msg")
        return f"{other}_{rest}"
    if mutation == "repeat":
        return value * 40
    if mutation == "unicode":
        return value + "\u0663\u00e9"
    return value


ID_MUTATIONS = st.sampled_from(["none"] * 6 + ["append", "truncate", "upper", "swap_prefix", "repeat", "unicode"])
LITERAL_IDS = st.one_of(
    st.sampled_from(
        [
            "resp_" + "0" * 32,
            "conv_" + "0" * 32,
            "msg_" + "0" * 32,
            "resp_" + "a" * 3000,
            "%00",
            "..",
            "resp_abc\u0000",
            "\u00b2",
            "resp_\U0001f600",
            "a b",
            "x" * 255,
        ]
    ),
    ANY_TEXT.filter(bool),
)


def refs(kind: str, caller: str = "a") -> st.SearchStrategy[Ref]:
    """An id for a route or a body of `caller`: mostly the caller's own objects, some of the other tenant's,
    some made up."""
    other = "b" if caller == "a" else "a"
    owners = st.sampled_from([caller, caller, caller, other])
    real = st.builds(Ref, st.just(kind), owners, st.integers(0, 7), st.just(""), ID_MUTATIONS)
    literal = LITERAL_IDS.map(lambda text: Ref("literal", literal=text))
    return weighted((4, real), (1, literal))


def any_id_ref(caller: str) -> st.SearchStrategy[Ref]:
    return st.one_of(refs("response", caller), refs("conversation", caller), refs("item", caller))


# --- bodies -------------------------------------------------------------------------------------------------


def message_items() -> st.SearchStrategy[list[Any]]:
    """Items as the SDK sends them (EasyInputMessage, typed messages, tool outputs, items with ids)."""
    text_ref = st.sampled_from(["hi", "what is 2+2?"])
    easy = st.builds(lambda text: {"role": "user", "content": text}, text_ref)
    typed = st.builds(
        lambda role, text: {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]},
        st.sampled_from(["user", "system", "developer"]),
        text_ref,
    )
    assistant = st.builds(
        lambda text: {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]},
        text_ref,
    )
    with_id = st.builds(
        lambda suffix, text: {"id": f"msg_{suffix}", "type": "message", "role": "user", "content": text},
        st.text("0123456789abcdef", min_size=1, max_size=32),
        text_ref,
    )
    tool_output = st.just({"type": "function_call_output", "call_id": "call_123", "output": "42"})
    call = st.just({"type": "function_call", "call_id": "call_123", "name": "get_weather", "arguments": "{}"})
    return st.lists(st.one_of(easy, easy, typed, assistant, with_id, tool_output, call), min_size=1, max_size=3)


FUNCTION_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "name": "answer",
    "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    "strict": True,
}


@st.composite
def create_bodies(draw: st.DrawFn, tag: str, caller: str) -> dict[str, Any]:
    """What `responses.create` (and `input_tokens.count`) sends."""
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["sim-1", "chat-1", "sim-1", "gpt-4o"])),
        "input": draw(st.one_of(st.just("hi"), message_items())),
        "metadata": {"sim_tag": tag},
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "instructions": st.just("Be brief."),
        "previous_response_id": refs("response", caller),
        "conversation": st.one_of(
            refs("conversation", caller), refs("conversation", caller).map(lambda ref: {"id": ref})
        ),
        "background": st.booleans(),
        "store": st.booleans(),
        "stream": st.booleans(),
        "tools": st.just([FUNCTION_TOOL]),
        "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "get_weather"}]),
        "parallel_tool_calls": st.booleans(),
        "max_output_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "text": st.sampled_from(
            [{"format": {"type": "text"}}, {"format": JSON_SCHEMA_FORMAT}, {"verbosity": "low"}, {"format": "json"}]
        ),
        "reasoning": st.just({"effort": "low", "summary": "auto"}),
        "truncation": st.sampled_from(["auto", "disabled"]),
        "include": st.just(["message.output_text.logprobs"]),
        "user": st.just("user-1"),
        "prompt_cache_key": st.just("cache-1"),
        "service_tier": st.sampled_from(["auto", "default"]),
        "stream_options": st.just({"include_obfuscation": False}),
        "context_management": st.just([{"type": "compaction", "compact_threshold": 1000}]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True))
    for name in chosen:
        body[name] = draw(optional[name])
    return body


@st.composite
def compact_bodies(draw: st.DrawFn, caller: str) -> dict[str, Any]:
    """What `responses.compact` sends."""
    body: dict[str, Any] = {"model": draw(st.sampled_from(["sim-1", "chat-1"]))}
    body["input"] = draw(st.one_of(st.just("hi"), message_items()))
    if draw(st.booleans()):
        body["previous_response_id"] = draw(refs("response", caller))
    if draw(st.booleans()):
        body["instructions"] = "Be brief."
    return body


def metadata_values() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


def conversation_create_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """What `conversations.create` sends (both fields optional)."""
    return st.fixed_dictionaries({}, optional={"items": message_items(), "metadata": metadata_values()})


def conversation_update_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"metadata": metadata_values()})


def item_create_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"items": message_items()})


def steer_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"input": st.one_of(st.just("also this"), message_items())})


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value a mutation can act on (Refs are leaves)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _replace(value: Any, path: tuple[Any, ...], make: Callable[[Any], Any]) -> Any:
    """`value` with the node at `path` replaced by `make(node)` (a new structure; `make` returning DROP removes
    it from its parent)."""
    if not path:
        return make(value)
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    replaced = _replace(copy[head], rest, make)
    if replaced is DROP:
        del copy[head]
    else:
        copy[head] = replaced
    return copy


DROP = object()
WRONG_STRINGS = st.one_of(
    st.sampled_from(["", "tool", "USER", "message ", "input_text", "function_call", "sim-1\u0000", "\u00b2"]), ANY_TEXT
)
UNKNOWN_FIELDS = st.sampled_from(["id", "type", "role", "content", "extra", "status", "__proto__", "\u0000", "a" * 300])


def _mutation(operation: str, junk: Any, name: str, as_list: bool, text: str) -> Callable[[Any], Any]:
    def mutate(node: Any) -> Any:
        if operation == "retext":  # a string where one goes, but not one the field takes
            return text
        if operation == "drop":
            return DROP
        if operation == "null":
            return None
        if operation == "junk":
            return junk
        if operation == "wrap":
            return [node] if as_list else {"value": node}
        return {**node, name: junk} if isinstance(node, dict) else node

    return mutate


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> Any:
    """An SDK-shaped body with 0-3 mutations: a field dropped, a value replaced by junk of another type, an
    unknown field added (also inside items), a value wrapped in a list or an object."""
    body: Any = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(body))))
        operation = draw(st.sampled_from(["drop", "junk", "junk", "retext", "add", "wrap", "null"]))
        if not path and operation in ("drop", "null"):
            operation = "add"
        make = _mutation(operation, draw(HOSTILE), draw(UNKNOWN_FIELDS), draw(st.booleans()), draw(WRONG_STRINGS))
        body = _replace(body, path, make)
    return body


def to_json(value: Any) -> bytes:
    """JSON as a client may write it: integers of any size (orjson stops at 64 bits), non-ASCII as UTF-8."""
    return json.dumps(value, ensure_ascii=False).encode()


@dataclass(frozen=True)
class RawBody:
    """A body sent as these bytes, not as JSON of a value."""

    data: bytes


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"null", b"[]", b"[{}]", b"1", b'"x"', b"true", b"\xff\xfe", b'{"a":1}{', b"{}" * 3]),
    SCALARS.map(to_json),
    st.lists(JUNK, max_size=3).map(to_json),
).map(RawBody)


def bodies(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """Mostly what the SDK sends, as it is or mutated; sometimes no JSON object at all."""
    return weighted((2, base), (3, mutated(base)), (1, st.one_of(RAW_BODIES, st.none())))


# --- requests -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # `{response}`, `{conversation}`, `{item}`, `{model}` are filled from refs
    query: tuple[str, ...] = ()  # the query parameters the route reads
    body: str | None = None  # the kind of body the SDK sends
    streams: bool = False  # reads Last-Event-ID


ROUTES = [
    Route("POST", "/v1/responses", body="create"),
    Route("GET", "/v1/responses"),  # WebSocket mode, without an upgrade
    Route("GET", "/v1/responses/{response}", ("stream", "starting_after", "include[]", "include"), streams=True),
    Route("DELETE", "/v1/responses/{response}"),
    Route("POST", "/v1/responses/{response}/cancel", body="empty"),
    Route("GET", "/v1/responses/{response}/input_items", ("after", "limit", "order", "include[]")),
    Route("POST", "/v1/responses/input_tokens", body="create"),
    Route("POST", "/v1/responses/compact", body="compact"),
    Route("POST", "/v1/responses/{response}/steer", body="steer"),
    Route("GET", "/v1/responses/{response}/steering"),
    Route("POST", "/v1/conversations", body="conversation_create"),
    Route("GET", "/v1/conversations/{conversation}"),
    Route("POST", "/v1/conversations/{conversation}", body="conversation_update"),
    Route("DELETE", "/v1/conversations/{conversation}"),
    Route("GET", "/v1/conversations/{conversation}/items", ("after", "limit", "order", "include[]")),
    Route("POST", "/v1/conversations/{conversation}/items", ("include[]",), body="item_create"),
    Route("GET", "/v1/conversations/{conversation}/items/{item}", ("include[]",)),
    Route("DELETE", "/v1/conversations/{conversation}/items/{item}"),
    Route("GET", "/v1/conversations/{conversation}/active_response", ("stream", "starting_after"), streams=True),
    Route("GET", "/v1/models"),
    Route("GET", "/v1/models/{model}"),
    Route("GET", "/healthz"),
    Route("GET", "/readyz"),
    # Methods and paths nobody serves: a 405 or a 404, in the envelope too.
    Route("PUT", "/v1/responses/{response}", body="create"),
    Route("PATCH", "/v1/conversations/{conversation}", body="conversation_update"),
    Route("GET", "/v1/responses/{response}/nothing"),
]


@dataclass(frozen=True)
class FuzzRequest:
    route: Route
    path_refs: dict[str, Ref | str]
    query: list[tuple[str, str]]
    headers: dict[str, str]
    auth: str  # the tenant whose key is sent, or "none"
    body: Any  # a JSON value (with Refs inside), RawBody, or None (no body)


QUERY_VALUES: dict[str, st.SearchStrategy[str]] = {
    "stream": weighted(
        (2, st.sampled_from(["true", "false"])), (1, st.sampled_from(["1", "0", "True", "yes", ""])), (1, ANY_TEXT)
    ),
    "starting_after": weighted((1, st.sampled_from(["0", "3", "-1"])), (3, HOSTILE_NUMBERS)),
    "limit": weighted((1, st.sampled_from(["1", "2", "20", "100"])), (3, HOSTILE_NUMBERS)),
    "order": weighted((2, st.sampled_from(["asc", "desc"])), (1, st.sampled_from(["ASC", ""])), (1, ANY_TEXT)),
    "include[]": st.one_of(
        st.sampled_from(["message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results"]),
        ANY_TEXT,
    ),
    "include": st.sampled_from(["message.output_text.logprobs", "nope"]),
}


@st.composite
def query_for(draw: st.DrawFn, route: Route, caller: str) -> list[tuple[str, str]]:
    """Each parameter the route reads, or not, sometimes twice; sometimes one it does not read."""
    pairs: list[tuple[str, Any]] = []
    for name in route.query:
        if name == "after":
            listed = "input_item" if route.template.startswith("/v1/responses") else "item"
            values = weighted((2, refs(listed, caller)), (1, any_id_ref(caller)), (1, HOSTILE_NUMBERS))
        else:
            values = QUERY_VALUES[name]
        for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
            pairs.append((name, draw(values)))
    if draw(st.integers(0, 4)) == 0:
        pairs.append((draw(st.sampled_from(["foo", "limit", "stream", "\u00e9"])), draw(ANY_TEXT)))
    return pairs


AUTH = st.sampled_from(["a", "a", "a", "a", "b", "b", "b", "b", "none"])


@st.composite
def hostile_headers(draw: st.DrawFn, route: Route) -> tuple[str, dict[str, str]]:
    """The tenant whose key is sent (or "none": a missing, malformed or unknown key), and the headers."""
    auth = draw(AUTH)
    headers: dict[str, str] = {}
    if auth != "none":
        key = KEYS[auth]
        headers["Authorization"] = draw(st.sampled_from([f"Bearer {key}", f"Bearer {key}", f"bearer {key}"]))
    else:
        malformed = draw(
            st.sampled_from(
                [
                    None,
                    "",
                    "Bearer",
                    "Bearer ",
                    f"Basic {KEY_A}",
                    KEY_A,
                    f"Bearer {KEY_A}x",
                    f"Bearer {KEY_A[:-1]}",
                    f"Bearer {KEY_A}\u00e9",
                    "Bearer \u00ff",
                    "Bearer sk-" + "a" * 4000,
                    f"Bearer {KEY_A} {KEY_B}",
                ]
            )
        )
        if malformed is not None:
            headers["Authorization"] = malformed
    if route.streams and draw(st.booleans()):
        headers["Last-Event-ID"] = draw(
            st.one_of(HOSTILE_NUMBERS, st.builds(lambda a, b: f"{a}.{b}", HOSTILE_NUMBERS, HOSTILE_NUMBERS))
        )
    if route.body is not None and draw(st.integers(0, 3)) == 0:
        headers["Idempotency-Key"] = draw(
            st.one_of(
                st.sampled_from(["fuzz-key-1", "fuzz-key-2", "", " ", "k" * 255, "k" * 256, "\u00e9", "a\tb"]),
                ANY_TEXT,
            )
        )
    if route.body is not None:
        content_type = draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/json",
                    "application/json",
                    None,
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=x",
                    "application/json; charset=latin-1",
                    "\u00e9/\u00e9",
                ]
            )
        )
        if content_type is not None:
            headers["Content-Type"] = content_type
    return auth, headers


def _header_safe(headers: dict[str, str]) -> dict[str, str]:
    """Headers well-formed at the protocol level (the low-level 400s are tested on their own): no control
    characters but tab in a value, which aiohttp's client refuses to send anyway."""
    return {name: value.translate(_HEADER_CONTROLS) for name, value in headers.items()}


_HEADER_CONTROLS: dict[int, None] = {code: None for code in [*range(0x20), 0x7F] if code != 0x09}


def _body_strategy(kind: str | None, tag: str, caller: str) -> st.SearchStrategy[Any]:
    if kind is None:
        return st.one_of(st.none(), st.none(), st.none(), RAW_BODIES)
    base: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "create": create_bodies(tag, caller),
        "compact": compact_bodies(caller),
        "steer": steer_bodies(),
        "conversation_create": conversation_create_bodies(),
        "conversation_update": conversation_update_bodies(),
        "item_create": item_create_bodies(),
        "empty": st.just({}),
    }
    return bodies(base[kind])


@st.composite
def fuzz_requests(draw: st.DrawFn, tag: str) -> FuzzRequest:
    # Routes that read more of the request are drawn more often.
    route = draw(st.sampled_from([route for route in ROUTES for _ in range(2 if route.query or route.body else 1)]))
    auth, headers = draw(hostile_headers(route))
    caller = auth if auth in TENANTS else "a"
    path_refs: dict[str, Ref | str] = {}
    for name in ("response", "conversation", "item"):
        if f"{{{name}}}" in route.template:
            path_refs[name] = draw(refs(name, caller))
    if "{model}" in route.template:
        path_refs["model"] = draw(st.one_of(st.sampled_from(["sim-1", "chat-1", "gpt-4o", "a/b", ".."]), ANY_TEXT))
    return FuzzRequest(
        route=route,
        path_refs=path_refs,
        query=draw(query_for(route, caller)),
        headers=_header_safe(headers),
        auth=auth,
        body=draw(_body_strategy(route.body, tag, caller)),
    )


SDK_BODIES: dict[str, Any] = {
    "create": {"model": "sim-1", "input": "hi"},
    "compact": {"model": "sim-1", "input": "hi"},
    "steer": {"input": "also this"},
    "conversation_create": {"items": [{"role": "user", "content": "hi"}], "metadata": {"k": "v"}},
    "conversation_update": {"metadata": {"k": "v"}},
    "item_create": {"items": [{"role": "user", "content": "hi"}]},
    "empty": {},
}


def plain_requests(tag: str) -> list[FuzzRequest]:
    """One request per route as the SDK sends it, with tenant A's own ids: run before the drawn ones, so every
    route is reached whatever the budget."""
    plain = []
    for route in ROUTES:
        names = [name for name in ("response", "conversation", "item") if f"{{{name}}}" in route.template]
        path_refs: dict[str, Ref | str] = {name: Ref(name) for name in names}
        if "{model}" in route.template:
            path_refs["model"] = "sim-1"
        headers = {"Authorization": f"Bearer {KEY_A}"}
        body = None
        if route.body is not None:
            headers["Content-Type"] = "application/json"
            body = SDK_BODIES[route.body]
            if route.body == "create":
                body = {**body, "metadata": {"sim_tag": tag}}
        plain.append(FuzzRequest(route, path_refs, [], headers, "a", body))
    return plain


# --- the harness --------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Real objects of one tenant, replaced when an example deletes one."""

    responses: list[str] = field(default_factory=list)
    conversations: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


class StoreView(Protocol):
    """What a backend holds, as seen from outside the gateway."""

    async def snapshot(self) -> dict[bytes, bytes]:
        """Every object stored, by name, and a digest of its value."""
        ...

    async def has_runs(self) -> bool:
        """Whether a response is owned or queued."""
        ...


@dataclass
class RedisView:
    redis: aioredis.Redis
    prefix: str

    async def snapshot(self) -> dict[bytes, bytes]:
        """Every key under the test's prefix, its value read canonically (DUMP is not: a large hash's bytes follow
        its table's layout, which a mere read can change while it rehashes)."""
        keys = sorted(await keys_with_prefix(self.redis, self.prefix))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            types = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, kind in zip(keys, types, strict=True):
                READ_VALUE[kind](pipe, key)
            values = await pipe.execute()
        return {key: _digest((kind, _canonical(value))) for key, kind, value in zip(keys, types, values, strict=True)}

    async def has_runs(self) -> bool:
        indexes = [
            key for key in await keys_with_prefix(self.redis, self.prefix) if key.endswith((b":runs", b":queue"))
        ]
        if not indexes:
            return False
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in indexes:
                pipe.zcard(key)
            return any(await pipe.execute())


@dataclass
class MemoryView:
    """The embedded store, read in place (a test's look inside: it has no other reader)."""

    store: MemoryStore

    async def snapshot(self) -> dict[bytes, bytes]:
        store = self.store
        objects: dict[str, Any] = {}
        for response_id, entry in store._entries.items():
            objects[f"response:{response_id}"] = _fields(entry)
        for conversation_id, conversation in store._conversations.items():
            objects[f"conversation:{conversation_id}"] = _fields(conversation)
        for (scope, key), (claim, _) in store._claims.items():
            objects[f"claim:{scope}:{key}"] = claim
        objects["runs"] = sorted(store._run_index)
        objects["queue"] = list(store._queue)
        objects["outbox"] = sorted(map(repr, store._outbox))
        return {name.encode(): _digest(value) for name, value in objects.items()}

    async def has_runs(self) -> bool:
        return bool(self.store._run_index or self.store._queue)


def _fields(value: Any) -> dict[str, Any]:
    """A dataclass's fields but its expiry (which moves with the clock, not with what is stored)."""
    return {item.name: getattr(value, item.name) for item in dataclasses.fields(value) if item.name != "expires_at"}


def _digest(value: Any) -> bytes:
    return hashlib.sha256(repr(value).encode()).digest()


@dataclass
class Fuzzer:
    gateway: Gateway
    store: StoreView
    simulator_url: str
    prefix: str
    tag: str
    clients: dict[str, openai.AsyncOpenAI]
    pools: dict[str, Pool] = field(default_factory=lambda: {tenant: Pool() for tenant in TENANTS})
    statuses: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)

    # -- the objects both tenants own

    async def populate(self) -> None:
        for tenant in TENANTS:
            for _ in range(3):
                self.pools[tenant].conversations.append(await self.new_conversation(tenant))
            for index in range(4):
                self.pools[tenant].responses.append(await self.new_response(tenant, index))

    async def new_conversation(self, tenant: str) -> str:
        items: list[Any] = [{"type": "message", "role": "user", "content": f"{tenant}'s item {i}"} for i in range(3)]
        conversation = await self.clients[tenant].conversations.create(items=items, metadata={"owner": tenant})
        return conversation.id

    async def new_response(self, tenant: str, index: int) -> str:
        """A finished response, of one of a few kinds: synchronous, background, a function call waiting for its
        output, a turn of one of the tenant's conversations."""
        client = self.clients[tenant]
        metadata = {"sim_tag": self.tag}
        kind = index % 4
        if kind == 0:
            response = await client.responses.create(model="sim-1", input=f"{tenant} sync", metadata=metadata)
        elif kind == 1:
            response = await client.responses.create(
                model="sim-1", input=f"{tenant} background", background=True, metadata=metadata
            )
        elif kind == 2:
            response = await client.responses.create(
                model="sim-1",
                input="weather in Paris?",
                tools=[FUNCTION_TOOL],
                metadata=metadata,  # type: ignore[list-item]
            )
        else:
            response = await client.responses.create(
                model="sim-1",
                input=f"{tenant} turn",
                conversation=self.pools[tenant].conversations[0],
                metadata=metadata,
            )
        return response.id

    # -- resolving what the strategy chose

    async def resolve(self, ref: Ref | str) -> str:
        if isinstance(ref, str):
            return ref
        if ref.kind == "literal":
            return ref.literal
        pool = self.pools[ref.owner]
        if ref.kind == "response":
            value = pool.responses[ref.index % len(pool.responses)]
        elif ref.kind == "conversation":
            value = pool.conversations[ref.index % len(pool.conversations)]
        elif ref.kind == "item":
            conversation = pool.conversations[ref.index % len(pool.conversations)]
            page = await self.clients[ref.owner].conversations.items.list(conversation, order="asc")
            ids = [item.id for item in page.data if item.id]  # type: ignore[union-attr]
            value = ids[ref.index % len(ids)] if ids else "msg_" + "0" * 32
        else:
            response = pool.responses[ref.index % len(pool.responses)]
            items = await self.clients[ref.owner].responses.input_items.list(response)
            ids = [item.id for item in items.data if getattr(item, "id", None)]
            value = ids[ref.index % len(ids)] if ids else "msg_" + "0" * 32
        return mutate_id(value, ref.mutation)

    async def resolve_body(self, value: Any) -> Any:
        if isinstance(value, Ref):
            return await self.resolve(value)
        if isinstance(value, dict):
            return {key: await self.resolve_body(child) for key, child in value.items()}
        if isinstance(value, list):
            return [await self.resolve_body(child) for child in value]
        return value

    def owner_of(self, value: Any) -> str | None:
        """The tenant whose response or conversation `value` is, if it is one of the pools' (unmutated)."""
        for tenant, pool in self.pools.items():
            if value in pool.responses or value in pool.conversations:
                return tenant
        return None

    # -- what is stored and sent

    async def busy(self) -> bool:
        """Whether a run is going on: a generation at the provider, or a response owned or queued (ended ones
        leave the run index once their follow-ups are done)."""
        return bool((await sim_stats(self.simulator_url))["active"]) or await self.store.has_runs()

    async def quiet(self) -> tuple[dict[bytes, bytes], int]:
        """Wait until no run is going on and the store stands still; then what it holds and the provider's count
        of calls."""
        deadline = time.monotonic() + QUIET_TIMEOUT_SECONDS
        previous: dict[bytes, bytes] | None = None
        while True:
            snapshot = await self.store.snapshot()
            if previous == snapshot and not await self.busy():
                return snapshot, int((await sim_stats(self.simulator_url))["requests"])
            if time.monotonic() > deadline:
                raise AssertionError(f"the gateway never came to rest within {QUIET_TIMEOUT_SECONDS}s")
            previous = snapshot
            await asyncio.sleep(0.02)

    # -- one example

    async def prepare(self, request: FuzzRequest) -> tuple[str, Any]:
        """The request's path and query, and its body, with the ids resolved."""
        path = request.route.template
        for name, ref in request.path_refs.items():
            path = path.replace(f"{{{name}}}", quote((await self.resolve(ref))[:URL_PART_CHARS], safe=""))
        query = [(name, (await self.resolve(value))[:URL_PART_CHARS]) for name, value in request.query]
        if query:
            path += "?" + "&".join(f"{quote(name, safe='[]')}={quote(value, safe='')}" for name, value in query)
        return path, await self.resolve_body(request.body)

    async def send(self, request: FuzzRequest, path: str, body: Any) -> Outcome:
        data: bytes | None
        if isinstance(body, RawBody):
            data = body.data
        elif body is None:
            data = None
        else:
            data = to_json(body)
        url = URL(self.gateway.url + path, encoded=True)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        async with self.gateway.http.request(
            request.route.method, url, data=data, headers=request.headers, timeout=timeout
        ) as reply:
            content_type = reply.headers.get("Content-Type", "")
            if reply.status == 200 and content_type.startswith("text/event-stream"):
                received = await _read_some(reply)
            else:
                received = await reply.read()
            return Outcome(reply.status, reply.content_type, dict(reply.headers), received)

    async def run(self, request: FuzzRequest) -> None:
        path, body = await self.prepare(request)
        before, calls_before = await self.quiet()
        outcome = await self.send(request, path, body)
        tally = self.statuses.setdefault((request.route.method, request.route.template), {})
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
        shown = f"{request.route.method} {path[:300]} -> {outcome.status} {outcome.body[:500]!r}"
        assert outcome.status < 500, shown
        if outcome.status >= 400:
            assert outcome.content_type == "application/json", shown
            envelope = orjson.loads(outcome.body)
            assert isinstance(envelope, dict), shown
            assert set(envelope) == {"error"}, shown
            error = envelope["error"]
            assert set(error) == ENVELOPE_KEYS, shown
            assert isinstance(error["message"], str), shown
            assert isinstance(error["type"], str), shown
            assert error["param"] is None or isinstance(error["param"], str), shown
            assert error["code"] is None or isinstance(error["code"], str), shown
            # A provider's refusal of a synchronous turn names the failed response it stored (x-response-id): that
            # request was accepted by the gateway and sent. Any other refusal leaves no trace.
            if "x-response-id" not in {name.lower() for name in outcome.headers}:
                after, calls_after = await self.quiet()
                assert calls_after == calls_before, f"{shown}\nsent upstream on refusal"
                assert after == before, f"{shown}\nstored on refusal: {_difference(before, after)}"
        if request.auth == "none" and request.route.template not in ("/healthz", "/readyz"):
            assert outcome.status == 401, shown
        if 200 <= outcome.status < 300 and request.auth in TENANTS:
            self.check_isolation(request, body, shown)
            await self.replace_deleted(request)

    def check_isolation(self, request: FuzzRequest, body: Any, shown: str) -> None:
        """A 2xx never served an object of the other tenant (named in the path or the body)."""
        named: list[Any] = []
        for ref in request.path_refs.values():
            if isinstance(ref, Ref) and ref.kind in ("response", "conversation") and ref.mutation == "none":
                named.append(ref)
        for ref in named:
            assert ref.owner == request.auth, f"{shown}\nanother tenant's object was served"
        if isinstance(body, dict):
            conversation = body.get("conversation")
            if isinstance(conversation, dict):
                conversation = conversation.get("id")
            for value in (body.get("previous_response_id"), conversation):
                owner = self.owner_of(value)
                assert owner in (None, request.auth), f"{shown}\nanother tenant's object was used"

    async def replace_deleted(self, request: FuzzRequest) -> None:
        """Keep each pool's size: an object an example deleted is replaced by a new one of its owner."""
        if request.route.method != "DELETE" or request.route.template.endswith("{item}"):
            return
        for name, ref in request.path_refs.items():
            if not isinstance(ref, Ref) or ref.kind != name or ref.mutation != "none":
                continue
            pool = self.pools[ref.owner]
            if name == "response":
                position = ref.index % len(pool.responses)
                pool.responses[position] = await self.new_response(ref.owner, position)
            else:
                position = ref.index % len(pool.conversations)
                old = pool.conversations[position]
                pool.conversations[position] = await self.new_conversation(ref.owner)
                if position == 0:  # the conversation responses of kind 3 are turns of
                    for index, response in enumerate(pool.responses):
                        if index % 4 == 3 and response:
                            pool.responses[index] = await self.new_response(ref.owner, index)
                del old


READ_VALUE: dict[bytes, Callable[[Any, bytes], Any]] = {
    b"string": lambda pipe, key: pipe.get(key),
    b"hash": lambda pipe, key: pipe.hgetall(key),
    b"list": lambda pipe, key: pipe.lrange(key, 0, -1),
    b"set": lambda pipe, key: pipe.smembers(key),
    b"zset": lambda pipe, key: pipe.zrange(key, 0, -1, withscores=True),
    b"stream": lambda pipe, key: pipe.xrange(key),
    b"none": lambda pipe, key: pipe.exists(key),  # expired between the scan and the read
}


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted(value.items())
    if isinstance(value, set):
        return sorted(value)
    return value


async def _read_some(reply: aiohttp.ClientResponse) -> bytes:
    """A 200 stream's bytes, cut after a while (it is the client's right to go away)."""
    received = bytearray()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(STREAM_READ_SECONDS):
            async for chunk in reply.content.iter_any():
                received += chunk
                if len(received) > STREAM_READ_BYTES:
                    break
    return bytes(received)


def _difference(before: dict[bytes, bytes], after: dict[bytes, bytes]) -> str:
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(key for key in set(before) & set(after) if before[key] != after[key])
    return f"created {created[:5]}, removed {removed[:5]}, changed {changed[:5]}"


def fuzz_settings(storage_url: str, simulator_url: str, prefix: str) -> Settings:
    """Two tenants, auth on; a Responses upstream for most models and a Chat one for `chat-*`, both tagged."""
    headers = {"x-sim-tag": prefix}
    upstreams = [
        {"name": "chat", "kind": "chat", "base_url": f"{simulator_url}/v1", "models": ["chat-*"], "headers": headers},
        {"name": "sim", "base_url": f"{simulator_url}/v1", "headers": headers},
    ]
    return two_tenant_settings(storage_url, simulator_url, prefix, upstreams=upstreams)


def _run(loop: asyncio.AbstractEventLoop, work: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(120):
            return await work

    return loop.run_until_complete(bounded())


@pytest.mark.timeout(max(120, LONG_MODE_EXAMPLES))
@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_no_input_gets_a_5xx_a_bare_error_or_leaves_a_trace(backend: str, redis_server: str, key_prefix: str) -> None:
    # Synchronous (pytest-asyncio runs in auto mode): hypothesis drives examples on one loop of the test's own,
    # with one gateway and one simulator (whose call count is this test's alone) for all.
    loop = asyncio.new_event_loop()
    tag = f"{key_prefix}-fuzz"
    with simulator_process("--tokens", "3", "--token-delay-ms", "0") as simulator_url:
        storage_url = redis_server if backend == "redis" else "memory://"
        served = serve_gateway(fuzz_settings(storage_url, simulator_url, key_prefix))
        gateway = _run(loop, served.__aenter__())
        redis_client = aioredis.Redis.from_url(redis_server)
        clients: dict[str, openai.AsyncOpenAI] = {}
        try:
            view: StoreView
            if backend == "redis":
                view = RedisView(redis_client, key_prefix)
            else:
                assert gateway.app is not None
                memory = real_store(gateway.app[STORE])  # under the metrics' timing wrapper
                assert isinstance(memory, MemoryStore)
                view = MemoryView(memory)
            clients = {
                tenant: openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[tenant], max_retries=0)
                for tenant in TENANTS
            }
            fuzzer = Fuzzer(gateway, view, simulator_url, key_prefix, tag, clients)
            _run(loop, fuzzer.populate())
            budget = settings(
                max_examples=EXAMPLES[backend],
                deadline=None,
                derandomize=not LONG_MODE_EXAMPLES,
                database=None,
                print_blob=True,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.large_base_example,
                ],
            )

            @budget
            @given(request=fuzz_requests(tag))
            def every_request_is_answered_well(request: FuzzRequest) -> None:
                _run(loop, fuzzer.run(request))

            for plain in plain_requests(tag):
                every_request_is_answered_well = example(request=plain)(every_request_is_answered_well)
            every_request_is_answered_well()
        finally:

            async def close() -> None:
                for client in clients.values():
                    await client.close()
                await redis_client.aclose()
                await served.__aexit__(None, None, None)

            _run(loop, close())
            loop.close()
    for (method, template), tally in sorted(fuzzer.statuses.items()):
        print(f"{method:6} {template:52} {dict(sorted(tally.items()))}")
    missed = {(route.method, route.template) for route in ROUTES} - set(fuzzer.statuses)
    assert not missed, f"routes no example reached: {sorted(missed)}"
