"""The SSE splitter: the same events whatever the chunk boundaries and line endings, and the same as the openai
SDK's own decoder wherever the two are meant to agree."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from runs.upstream.sse import SSEEvent, SSESplitter

BOM = b"\xef\xbb\xbf"
LINE_ENDINGS = ("\n", "\r\n", "\r")


def split(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    """Feed `stream` cut at `cuts`; every event, in order."""
    splitter = SSESplitter()
    events: list[SSEEvent] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        events.extend(splitter.feed(stream[start:end]))
    return events


def bytewise(stream: bytes) -> list[SSEEvent]:
    return split(stream, list(range(len(stream))))


def test_the_common_shapes() -> None:
    stream = b'data: {"a":1}\n\nevent: response.created\ndata: {"b":2}\n\n'
    expected = [(b"", b'{"a":1}'), (b"response.created", b'{"b":2}')]
    assert split(stream, []) == expected
    assert bytewise(stream) == expected


def test_crlf_cut_between_cr_and_lf_is_one_line_ending() -> None:
    stream = b"data: 1\r\n\r\ndata: 2\r\n\r\n"
    assert bytewise(stream) == [(b"", b"1"), (b"", b"2")]
    # Cut right after each `\r`: a `\n` opening the next chunk belongs to it, not a blank line of its own.
    assert split(stream, [i + 1 for i, byte in enumerate(stream) if byte == 0x0D]) == [(b"", b"1"), (b"", b"2")]


def test_bare_cr_line_endings() -> None:
    assert bytewise(b"event: x\rdata: 1\r\rdata: 2\r\r") == [(b"x", b"1"), (b"", b"2")]


def test_comments_fields_without_a_space_and_several_data_lines() -> None:
    stream = b': keep-alive\n\n:another\nevent:delta\nid: 7\nretry: 10\ndata:{"a":\ndata:  1}\nfoo: bar\n\n'
    assert split(stream, []) == [(b"delta", b'{"a":\n 1}')]


def test_a_field_without_a_colon_is_an_empty_value() -> None:
    assert split(b"data\ndata: x\n\n", []) == [(b"", b"\nx")]


def test_events_without_data_are_not_dispatched() -> None:
    assert split(b"event: ping\n\nid: 3\n\ndata:\n\n\n\n\ndata: 1\n\n", []) == [(b"", b"1")]


def test_a_leading_bom_is_dropped_even_when_cut() -> None:
    stream = BOM + b"data: 1\n\n"
    assert bytewise(stream) == [(b"", b"1")]
    assert split(stream, [1]) == [(b"", b"1")]
    # Only a leading one: elsewhere it is part of the line (here an unknown field name).
    assert split(b"data: 1\n\n" + BOM + b"data: 2\n\n", []) == [(b"", b"1")]


def test_done_ends_the_stream() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: 1\n\ndata: [DONE]\n\ndata: 2\n\n") == [(b"", b"1")]
    assert splitter.done
    assert splitter.feed(b"data: 3\n\n") == []


def test_an_event_cut_off_by_the_end_is_not_dispatched() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2\n") == [(b"", b"1")]
    assert not splitter.done


# Property: arbitrary streams, any line ending, any cuts.

_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=12)


@dataclass(frozen=True)
class Field:
    """One line of a generated event."""

    name: str  # "data", "event", "id", "retry", an unknown field, or "" for a comment
    value: str
    space: bool  # a space after the colon

    def line(self) -> str:
        if not self.name:
            return f":{self.value}"
        return f"{self.name}:{' ' if self.space else ''}{self.value}"

    def parsed_value(self) -> str:
        # The parser drops one space after the colon, whether we put it there or the value began with one.
        value = f"{' ' if self.space else ''}{self.value}"
        return value.removeprefix(" ")


_fields = st.builds(
    Field, st.sampled_from(["data", "data", "data", "event", "id", "retry", "other", ""]), _text, st.booleans()
)
_events = st.lists(st.tuples(st.lists(_fields, max_size=5), st.integers(0, 2)), max_size=8)


def expected_events(events: list[tuple[list[Field], int]]) -> list[SSEEvent]:
    """What the WHATWG parser dispatches, up to the first `[DONE]`."""
    out: list[SSEEvent] = []
    for fields, _ in events:
        data = [field.parsed_value() for field in fields if field.name == "data"]
        names = [field.parsed_value() for field in fields if field.name == "event"]
        joined = "\n".join(data)
        if not data or not joined:
            continue
        if joined.startswith("[DONE]"):
            break
        out.append(((names[-1] if names else "").encode(), joined.encode()))
    return out


def serialise(events: list[tuple[list[Field], int]], ending: str, tail: list[Field]) -> bytes:
    """Each event's lines, a blank line, and some more blank lines; then an unterminated event."""
    text = "".join(
        "".join(field.line() + ending for field in fields) + ending * (1 + blanks) for fields, blanks in events
    )
    text += "".join(field.line() + ending for field in tail)
    return text.encode()


@given(
    events=_events,
    tail=st.lists(_fields, max_size=3),
    bom=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=30),
)
def test_any_cuts_and_any_line_ending_give_the_same_events(
    events: list[tuple[list[Field], int]], tail: list[Field], bom: bool, cuts: list[int]
) -> None:
    expected = expected_events(events)
    for ending in LINE_ENDINGS:
        stream = (BOM if bom else b"") + serialise(events, ending, tail)
        assert split(stream, [cut for cut in cuts if cut < len(stream)]) == expected, ending


@given(events=_events, tail=st.lists(_fields, max_size=3))
def test_the_sdk_decoder_agrees_on_every_event_with_data(
    events: list[tuple[list[Field], int]], tail: list[Field]
) -> None:
    """The SDK dispatches data-less events too (and then fails to parse them); otherwise the two agree."""
    for ending in LINE_ENDINGS:
        stream = serialise(events, ending, tail)
        sdk: list[SSEEvent] = []
        for sse in SSEDecoder().iter_bytes(iter([stream])):
            if sse.data.startswith("[DONE]"):
                break
            if sse.data:
                sdk.append(((sse.event or "").encode(), sse.data.encode()))
        assert bytewise(stream) == sdk, ending
