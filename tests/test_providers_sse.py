"""The incremental SSE parser and the generic observers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tokenfirewall.errors import ConfigurationError
from tokenfirewall.providers import (
    AnthropicProvider,
    GenericProvider,
    OpenAIProvider,
    Provider,
    Usage,
    get_provider,
)
from tokenfirewall.providers.observers import JSONObserver, SSEObserver, standard_observer
from tokenfirewall.providers.sse import SSEEvent, SSEParser


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (empty chunks included)."""
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def parse(chunks: list[bytes], max_event_bytes: int = 1024 * 1024) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close()


def names_and_data(events: list[SSEEvent]) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in events]


def test_fields_comments_and_multiline_data() -> None:
    stream = (
        b": keep-alive comment\n"
        b"event: update\nid: 7\nretry: 1000\ndata: first\ndata:second\ndata\n\n"
        b'data: {"a": 1}\n\n'
    )
    assert names_and_data(parse([stream])) == [
        ("update", "first\nsecond\n"),
        ("message", '{"a": 1}'),
    ]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = eol.join([b"event: e", b"data: x", b"", b"data: y", b"", b""])
    assert names_and_data(parse([stream])) == [("e", "x"), ("message", "y")]


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    events = parse([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])
    assert names_and_data(events) == [("message", "a"), ("message", "b")]


def test_multibyte_utf8_split_inside_a_character() -> None:
    stream = "data: héllo 👋 世界\n\n".encode()
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert names_and_data(parse(chunks)) == [("message", "héllo 👋 世界")]


def test_leading_bom_is_ignored_and_invalid_utf8_replaced() -> None:
    events = parse([b"\xef\xbb", b"\xbfdata: \xff ok\n\n"])
    assert names_and_data(events) == [("message", "\ufffd ok")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert parse([b"\n\n: c\n\nevent: x\n\n"]) == []


def test_offsets_delimit_each_event_block() -> None:
    stream = b": hi\r\ndata: a\r\n\r\nevent: b\ndata: c\n\n\n"
    events = parse(split(stream, [3, 9, 17, 18]))
    assert [stream[e.start : e.end] for e in events] == [
        b": hi\r\ndata: a\r\n\r\n",
        b"event: b\ndata: c\n\n",
    ]


def test_unterminated_last_event_is_kept_at_close() -> None:
    assert names_and_data(parse([b"data: a\n\ndata: tail"])) == [
        ("message", "a"),
        ("message", "tail"),
    ]
    assert names_and_data(parse([b"data: tail\r"])) == [("message", "tail")]


def test_oversize_event_is_dropped_and_parsing_resumes() -> None:
    with capture_logs() as logs:
        events = parse([b"data: " + b"x" * 50 + b"\ndata: y\n\n", b"data: ok\n\n"], 32)
    assert names_and_data(events) == [("message", "ok")]
    assert any(log["event"] == "sse_event_dropped" for log in logs)


def test_oversize_line_split_across_chunks_is_dropped() -> None:
    chunks = [b"data: " + b"z" * 20 for _ in range(10)] + [b"\r", b"\n\r\ndata: ok\n\n"]
    assert names_and_data(parse(chunks, 64)) == [("message", "ok")]


def test_parser_memory_is_bounded() -> None:
    parser = SSEParser(100)
    for _ in range(1000):
        parser.feed(b"data: " + b"q" * 50)
    assert len(parser._buf) <= 100


_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"))


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    """Well-formed streams mixing every line ending, comments and field kinds."""
    out = b""
    for _ in range(draw(st.integers(0, 5))):
        eol = draw(_LINE_ENDS)  # one per event: a \r then \n would merge into CRLF
        lines = [
            draw(st.sampled_from([b"event: ", b"data: ", b"data:", b": ", b"id: "]))
            + draw(_TEXT).encode()
            for _ in range(draw(st.integers(0, 4)))
        ]
        out += b"".join(line + eol for line in [*lines, b""])
    return out


@given(event_streams(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_gives_the_same_events(stream: bytes, cuts: list[int]) -> None:
    assert parse(split(stream, cuts)) == parse([stream])


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=20))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    events = parse(split(data, cuts), 256)
    assert events == parse([data], 256)
    for provider in (OpenAIProvider(), AnthropicProvider(), GenericProvider()):
        for kind in ("text/event-stream", "application/json"):
            observer = provider.observer(provider.estimate("/v1/x", data, 10), 200, kind)
            assert observer is not None
            for chunk in split(data, cuts):
                assert observer.feed(chunk) == chunk
            assert observer.close() == b""


def test_standard_observer_by_content_type() -> None:
    assert isinstance(standard_observer("text/event-stream; charset=utf-8"), SSEObserver)
    assert isinstance(standard_observer("Application/JSON"), JSONObserver)
    assert isinstance(standard_observer("application/problem+json"), JSONObserver)
    assert standard_observer("text/plain") is None
    assert standard_observer(None) is None


def test_json_observer_is_bounded() -> None:
    observer = JSONObserver(max_bytes=64)
    body = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 1}, "pad": "' + b"x" * 100 + b'"}'
    with capture_logs() as logs:
        assert observer.feed(body) == body
        assert observer.close() == b""
    assert observer.usage is None
    assert logs[0]["event"] == "json_response_too_large"


def test_generic_provider_reads_top_level_usage_with_either_naming() -> None:
    provider = get_provider("generic")
    estimate = provider.estimate("/anything", b'{"stream": true, "model": "m"}', 321)
    assert (estimate.tokens, estimate.stream, estimate.model) == (321, True, "m")
    for body, usage in [
        (b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}', Usage(3, 4)),
        (b'{"usage": {"input_tokens": 3, "output_tokens": 4}}', Usage(3, 4)),
        (b'{"result": "no usage here"}', None),
    ]:
        observer = provider.observer(estimate, 200, "application/json")
        assert observer is not None
        observer.feed(body)
        observer.close()
        assert observer.usage == usage


def test_get_provider() -> None:
    assert isinstance(get_provider("openai"), OpenAIProvider)
    assert isinstance(get_provider(" Anthropic "), AnthropicProvider)
    custom = GenericProvider()
    assert get_provider(custom) is custom
    assert all(isinstance(get_provider(n), Provider) for n in ("openai", "anthropic", "generic"))
    with pytest.raises(ConfigurationError, match="unknown provider"):
        get_provider("gemini")
    with pytest.raises(ValueError, match="unknown provider"):
        get_provider(42)  # type: ignore[arg-type]
