"""Anthropic Messages API wire formats: estimates and usage from responses."""

from __future__ import annotations

import itertools
import json

import pytest
from anthropic.types import Message
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tokenfirewall.providers import MAX_USAGE_TOKENS, AnthropicProvider, Estimate, Usage
from tokenfirewall.providers.tokens import IMAGE_TOKENS

PROVIDER = AnthropicProvider()
MESSAGES = "/v1/messages"
DEFAULT = 1000


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def observe(chunks: list[bytes], content_type: str) -> tuple[bytes, Usage | None]:
    estimate = PROVIDER.estimate(MESSAGES, b'{"messages": [], "max_tokens": 10}', DEFAULT)
    observer = PROVIDER.observer(estimate, 200, content_type)
    assert observer is not None
    forwarded = b"".join(observer.feed(chunk) for chunk in chunks) + observer.close()
    return forwarded, observer.usage


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# --- realistic upstream responses ---------------------------------------------------------

_START_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2000,
    "output_tokens": 1,
    "service_tier": "standard",
}
_FINAL_USAGE = {**_START_USAGE, "output_tokens": 15}
_MESSAGE_START: dict[str, object] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "content": [],
    "model": "claude-sonnet-4-5-20250929",
    "stop_reason": None,
    "stop_sequence": None,
    "usage": _START_USAGE,
}
_TOOL = {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "f", "input": {}}
_STOP = {"stop_reason": "tool_use", "stop_sequence": None}


def _text(index: int, text: str) -> dict[str, object]:
    return {"index": index, "delta": {"type": "text_delta", "text": text}}


def _json(index: int, partial: str) -> dict[str, object]:
    return {"index": index, "delta": {"type": "input_json_delta", "partial_json": partial}}


_STREAM_EVENTS: list[tuple[str, dict[str, object]]] = [
    ("message_start", {"message": _MESSAGE_START}),
    ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {}),
    ("content_block_delta", _text(0, "Héllo 👋")),
    ("content_block_delta", _text(0, " 世界")),
    ("content_block_stop", {"index": 0}),
    ("content_block_start", {"index": 1, "content_block": _TOOL}),
    # Tool input that mentions usage must not be mistaken for usage.
    ("content_block_delta", _json(1, '{"usage": {"output_tokens": 99999')),
    ("content_block_delta", _json(1, "}}")),
    ("content_block_stop", {"index": 1}),
    ("message_delta", {"delta": _STOP, "usage": {"output_tokens": 7}}),
    # Newer API versions repeat the (cumulative) input figures here.
    ("message_delta", {"delta": _STOP, "usage": _FINAL_USAGE}),
    ("message_stop", {}),
]
MESSAGE_STREAM = "".join(
    f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"
    for name, data in _STREAM_EVENTS
).encode()

MESSAGE_JSON = (
    '{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant",'
    '"content":[{"type":"text","text":"Hello!"}],"model":"claude-sonnet-4-5-20250929",'
    '"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,'
    '"cache_creation_input_tokens":0,"cache_read_input_tokens":300,"output_tokens":6}}'
)


def test_fixture_is_a_valid_message() -> None:
    assert Message.model_validate_json(MESSAGE_JSON).usage.output_tokens == 6


# --- estimates -----------------------------------------------------------------------------


def test_estimate_is_prompt_plus_max_tokens() -> None:
    request = body(
        model="claude-sonnet-4-5",
        max_tokens=1024,
        stream=True,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "Hello, Claude"}],
    )
    estimate = PROVIDER.estimate(MESSAGES, request, DEFAULT)
    assert estimate.stream
    assert estimate.model == "claude-sonnet-4-5"
    assert estimate.body is None
    assert not estimate.injected_usage
    assert 1024 < estimate.tokens < 1060


def test_estimate_counts_images_documents_and_tools() -> None:
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 100  # ~1200 tokens
    content = [
        {"type": "image", "source": {"type": "base64", "data": "/9j/" * 50_000}},
        {"type": "document", "source": {"type": "text", "data": text}},
        {"type": "document", "source": {"type": "base64", "data": "J" * 64_000}},
    ]
    tools = [{"name": "get_weather", "description": text, "input_schema": {"type": "object"}}]
    request = body(max_tokens=1, messages=[{"role": "user", "content": content}], tools=tools)
    estimate = PROVIDER.estimate(MESSAGES, request, DEFAULT)
    pdf_tokens = 64_000 * 3 // 4 // 32
    assert estimate.tokens > IMAGE_TOKENS + 2 * 1200 + pdf_tokens
    assert estimate.tokens < IMAGE_TOKENS + 2 * 2500 + pdf_tokens


def test_no_cap_reserves_the_default_for_the_output() -> None:
    estimate = PROVIDER.estimate(MESSAGES, body(messages=[]), DEFAULT)
    assert DEFAULT < estimate.tokens < DEFAULT + 20


@pytest.mark.parametrize(
    "raw",
    [b"", b"<html>", b"[]", b"{", b"[" * 5000, body(messages={"a": 1}, max_tokens=[]),
     body(messages=[{"role": "user", "content": [{"type": "image"}, None, 5]}], max_tokens=False)],
)  # fmt: skip
def test_malformed_requests_never_raise(raw: bytes) -> None:
    estimate = PROVIDER.estimate(MESSAGES, raw, DEFAULT)
    assert 1 <= estimate.tokens <= MAX_USAGE_TOKENS
    assert estimate.body is None


def test_other_shapes_reserve_the_default() -> None:
    assert PROVIDER.estimate("/v1/models", b"", DEFAULT) == Estimate(DEFAULT)
    batches = body(requests=[{"custom_id": "a", "params": {}}])
    assert PROVIDER.estimate("/v1/messages/batches", batches, DEFAULT).tokens == DEFAULT


# --- usage from responses ------------------------------------------------------------------


@given(st.lists(st.integers(0, 5000), max_size=40))
def test_stream_usage_any_split(cuts: list[int]) -> None:
    forwarded, usage = observe(split(MESSAGE_STREAM, cuts), "text/event-stream; charset=utf-8")
    assert forwarded == MESSAGE_STREAM
    assert usage == Usage(input_tokens=2125, output_tokens=15)


def test_stream_output_is_cumulative_and_usage_known_early() -> None:
    estimate = PROVIDER.estimate(MESSAGES, b"{}", DEFAULT)
    observer = PROVIDER.observer(estimate, 200, "text/event-stream")
    assert observer is not None
    events = MESSAGE_STREAM.split(b"\n\n")
    observer.feed(events[0] + b"\n\n")
    assert observer.usage == Usage(2125, 1)  # known before the stream ends
    for output in (40, 9):
        delta = {"type": "message_delta", "usage": {"output_tokens": output}}
        observer.feed(b"event: message_delta\ndata: " + json.dumps(delta).encode() + b"\n\n")
    observer.close()
    assert observer.usage == Usage(2125, 40)


def test_error_event_mid_stream_keeps_usage_so_far() -> None:
    stream = (
        MESSAGE_STREAM.split(b"\n\n")[0] + b"\n\n"
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    assert observe([stream], "text/event-stream")[1] == Usage(2125, 1)


@pytest.mark.parametrize(
    ("response", "usage"),
    [
        (MESSAGE_JSON, Usage(312, 6)),
        ('{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}', None),
        ('{"usage":{"input_tokens":-1,"cache_read_input_tokens":5,"output_tokens":2.0}}',
         Usage(5, 0)),
        ('{"usage":{"input_tokens":"12","output_tokens":false}}', None),
        ('{"usage":{"input_tokens":99999999999,"cache_read_input_tokens":99999999999,'
         '"output_tokens":1}}', Usage(MAX_USAGE_TOKENS, 1)),
        ('{"usage":', None),
        ("[1, 2, 3]", None),
    ],
)  # fmt: skip
def test_json_usage(response: str, usage: Usage | None) -> None:
    data = response.encode()
    with capture_logs():
        forwarded, seen = observe(split(data, [5, 50]), "application/json")
    assert forwarded == data
    assert seen == usage


def test_absurd_stream_usage_logs_a_warning() -> None:
    stream = (
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":-40}}\n\n'
    )
    with capture_logs() as logs:
        _, usage = observe([stream], "text/event-stream")
    assert usage is None
    assert logs == [
        {
            "event": "provider_usage_ignored",
            "field": "output_tokens",
            "reason": "negative",
            "value": -40,
            "log_level": "warning",
        }
    ]


@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=10))
def test_corrupted_stream_never_raises(noise: bytes, cuts: list[int]) -> None:
    stream = MESSAGE_STREAM[: len(noise)] + noise
    forwarded, _ = observe(split(stream, cuts), "text/event-stream")
    assert forwarded == stream
