"""OpenAI wire formats: estimates, include_usage injection, usage from responses."""

from __future__ import annotations

import itertools
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk
from structlog.testing import capture_logs

from tokenfirewall.providers import MAX_USAGE_TOKENS, Estimate, OpenAIProvider, Usage
from tokenfirewall.providers.tokens import IMAGE_TOKENS

PROVIDER = OpenAIProvider()
CHAT = "/v1/chat/completions"
DEFAULT = 1000


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def observe(
    estimate: Estimate, chunks: list[bytes], content_type: str
) -> tuple[bytes, Usage | None]:
    observer = PROVIDER.observer(estimate, 200, content_type)
    assert observer is not None
    forwarded = b"".join(observer.feed(chunk) for chunk in chunks) + observer.close()
    return forwarded, observer.usage


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# --- realistic upstream responses ---------------------------------------------------------

_CHUNK_HEAD = (
    '{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk",'
    '"created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    '"system_fingerprint":"fp_f9f4fb6dbf","choices":'
)
_DELTAS = [
    '{"role":"assistant","content":"","refusal":null}',
    '{"content":"Héllo"}',
    '{"content":" 👋 世界"}',
    '{"content":"! How can I help?"}',
]
_CHAT_USAGE = (
    '{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,'
    '"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}'
)


def chat_stream(include_usage: bool) -> bytes:
    """A chat completion stream as OpenAI sends it, with or without include_usage."""
    tail = ',"usage":null}' if include_usage else "}"
    choices = [
        f'[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":null}}]' for delta in _DELTAS
    ]
    choices.append('[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]')
    events = [_CHUNK_HEAD + c + tail for c in choices]
    if include_usage:
        events.append(_CHUNK_HEAD + '[],"usage":' + _CHAT_USAGE + "}")
    events.append("[DONE]")
    return "".join(f"data: {e}\n\n" for e in events).encode()


def legacy_stream(include_usage: bool) -> bytes:
    head = (
        '{"id":"cmpl-AbC","object":"text_completion","created":1741569952,'
        '"model":"gpt-3.5-turbo-instruct"'
    )
    tail = ',"usage":null}' if include_usage else "}"
    events = [
        head
        + ',"choices":[{"text":"'
        + text
        + '","index":0,"logprobs":null,"finish_reason":null}]'
        + tail
        for text in ("Once", " upon", " a time")
    ]
    if include_usage:
        usage = '{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}'
        events.append(head + ',"choices":[],"usage":' + usage + "}")
    events.append("[DONE]")
    return "".join(f"data: {e}\r\n\r\n" for e in events).encode()


_RESPONSE = (
    '{{"id":"resp_67ccd2bed1ec8190b14f964abc054267","object":"response","created_at":1741476542,'
    '"status":"{status}","error":null,"incomplete_details":null,"instructions":null,'
    '"max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":{output},'
    '"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{{"effort":null,'
    '"summary":null}},"store":true,"temperature":1.0,"text":{{"format":{{"type":"text"}}}},'
    '"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{usage},'
    '"user":null,"metadata":{{}}}}'
)
_RESPONSE_USAGE = (
    '{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,'
    '"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}'
)
_MESSAGE = (
    '{"id":"msg_67ccd2bf17f0819081ff3bb2cf6508e6","type":"message","status":"completed",'
    '"role":"assistant","content":[{"type":"output_text","text":"Hi there","annotations":[]}]}'
)


def _response(status: str, output: str, usage: str) -> str:
    return '"response":' + _RESPONSE.format(status=status, output=output, usage=usage)


def responses_stream() -> bytes:
    """A Responses API stream: named events, usage only in response.completed."""
    item = '"item_id":"msg_67cc","output_index":0,"content_index":0'
    part = '"part":{"type":"output_text","text":"%s","annotations":[]}'
    added = (
        '{"id":"msg_67cc","type":"message","status":"in_progress","role":"assistant","content":[]}'
    )
    events = [
        ("response.created", _response("in_progress", "[]", "null")),
        ("response.in_progress", _response("in_progress", "[]", "null")),
        ("response.output_item.added", '"output_index":0,"item":' + added),
        ("response.content_part.added", item + "," + part % ""),
        ("response.output_text.delta", item + ',"delta":"Hi"'),
        # Output text that mentions usage must not be mistaken for usage.
        ("response.output_text.delta", item + ',"delta":" there, \\"usage\\": 1"'),
        ("response.output_text.done", item + ',"text":"Hi there"'),
        ("response.content_part.done", item + "," + part % "Hi there"),
        ("response.output_item.done", '"output_index":0,"item":' + _MESSAGE),
        ("response.completed", _response("completed", f"[{_MESSAGE}]", _RESPONSE_USAGE)),
    ]
    return "".join(
        f'event: {name}\ndata: {{"type":"{name}","sequence_number":{i},{data}}}\n\n'
        for i, (name, data) in enumerate(events)
    ).encode()


# --- estimates -----------------------------------------------------------------------------


def test_chat_estimate_is_prompt_plus_cap_times_n() -> None:
    messages = [{"role": "user", "content": "hi"}]
    one = PROVIDER.estimate(CHAT, body(model="gpt-4o", messages=messages, max_tokens=100), DEFAULT)
    three = PROVIDER.estimate(CHAT, body(messages=messages, max_tokens=100, n=3), DEFAULT)
    assert one.model == "gpt-4o"
    assert not one.stream
    assert one.body is None
    assert 100 < one.tokens < 120
    assert three.tokens - one.tokens == 200


def test_cap_fields_and_default_reservation() -> None:
    messages = [{"role": "user", "content": "hi"}]
    capped = PROVIDER.estimate(CHAT, body(messages=messages, max_completion_tokens=50), DEFAULT)
    uncapped = PROVIDER.estimate(CHAT, body(messages=messages), DEFAULT)
    assert uncapped.tokens - capped.tokens == DEFAULT - 50
    responses = PROVIDER.estimate("/v1/responses", body(input="hi", max_output_tokens=50), DEFAULT)
    assert 50 < responses.tokens < 60


def test_prompt_counts_text_in_every_place_conservatively() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 200  # ~2000 real tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    messages = [
        {"role": "system", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}, image]},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": text}}]
    estimate = PROVIDER.estimate(CHAT, body(messages=messages, tools=tools, max_tokens=1), DEFAULT)
    assert 3 * 2000 + IMAGE_TOKENS < estimate.tokens < 3 * 4000 + IMAGE_TOKENS
    cjk = body(messages=[{"role": "user", "content": "世界" * 500}], max_tokens=1)
    multibyte = PROVIDER.estimate(CHAT, cjk, DEFAULT)
    assert multibyte.tokens >= 1000  # at least one token per CJK character


def test_embeddings_reserve_only_the_input() -> None:
    one = body(model="text-embedding-3-small", input="hello world")
    single = PROVIDER.estimate("/v1/embeddings", one, DEFAULT)
    batch = PROVIDER.estimate("/v1/embeddings", body(input=["a" * 300, [1, 2, 3, 4]]), DEFAULT)
    assert 1 <= single.tokens < 20
    assert 104 <= batch.tokens < 120


def test_legacy_completions_batch_and_best_of() -> None:
    request = body(prompt=["a", "b"], max_tokens=10, n=2, best_of=5)
    estimate = PROVIDER.estimate("/v1/completions", request, DEFAULT)
    assert estimate.tokens >= 2 * 5 * 10


def test_body_shape_decides_on_unknown_paths_and_prefixes_work() -> None:
    chat = body(messages=[{"role": "user", "content": "x"}], max_tokens=7, stream=True)
    assert PROVIDER.estimate("/api/chat", chat, DEFAULT).tokens < 30
    assert PROVIDER.estimate("/api/chat", chat, DEFAULT).body is None  # no injection off-API
    assert PROVIDER.estimate("/openai/v1/chat/completions/", chat, DEFAULT).injected_usage
    assert PROVIDER.estimate("/api/other", body(foo=1, stream=True), DEFAULT) == Estimate(
        DEFAULT, stream=True
    )


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1, 2]", b'"string"', b"null", b'{"messages": ', b"[" * 5000,
     b"\xff\xfe", body(messages="oops", max_tokens="many", n=-3),
     body(messages=[None, 1, [[]]], max_tokens=True),
     body(input={"deep": [[[[[[[[[[{"a": "b"}]]]]]]]]]]}), body(stream="yes", stream_options=[])],
)  # fmt: skip
def test_malformed_requests_never_raise(raw: bytes) -> None:
    estimate = PROVIDER.estimate(CHAT, raw, DEFAULT)
    assert 1 <= estimate.tokens <= MAX_USAGE_TOKENS
    assert estimate.body is None


def test_absurd_caps_are_bounded() -> None:
    estimate = PROVIDER.estimate(CHAT, body(messages=[], max_tokens=10**30, n=10**6), DEFAULT)
    assert estimate.tokens == MAX_USAGE_TOKENS
    assert PROVIDER.estimate(CHAT, body(messages=[], max_tokens=-5), DEFAULT).tokens > DEFAULT
    assert PROVIDER.estimate(CHAT, b"{}", 0).tokens >= 1


# --- include_usage injection ---------------------------------------------------------------


def test_injection_preserves_the_request() -> None:
    messages = [{"role": "user", "content": "é"}]
    original = body(messages=messages, stream=True, seed=99999999999999999999, temperature=0.7)
    estimate = PROVIDER.estimate(CHAT, original, DEFAULT)
    assert estimate.stream
    assert estimate.injected_usage
    assert estimate.body is not None
    assert json.loads(estimate.body) == {
        **json.loads(original),
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    ("options", "injected"),
    [
        (None, True),
        ({"include_usage": False}, True),
        ({"include_obfuscation": False}, True),
        ({"include_usage": True}, False),
        ("bogus", False),
    ],
)
def test_injection_only_when_needed(options: object, injected: bool) -> None:
    fields: dict[str, object] = {"messages": [], "stream": True}
    if options is not None:
        fields["stream_options"] = options
    estimate = PROVIDER.estimate(CHAT, body(**fields), DEFAULT)
    assert estimate.injected_usage is injected
    if injected:
        assert estimate.body is not None
        sent = json.loads(estimate.body)["stream_options"]
        assert sent == {**(options if isinstance(options, dict) else {}), "include_usage": True}


def test_no_injection_for_unstreamed_or_responses_requests() -> None:
    assert PROVIDER.estimate(CHAT, body(messages=[], stream=False), DEFAULT).body is None
    streamed = PROVIDER.estimate("/v1/responses", body(input="hi", stream=True), DEFAULT)
    assert streamed.stream
    assert streamed.body is None


@given(st.lists(st.integers(0, 5000), max_size=40))
def test_injected_usage_round_trip_any_split(cuts: list[int]) -> None:
    estimate = PROVIDER.estimate(CHAT, body(messages=[], stream=True), DEFAULT)
    forwarded, usage = observe(estimate, split(chat_stream(True), cuts), "text/event-stream")
    assert forwarded == chat_stream(False)
    assert usage == Usage(19, 10)


@given(st.lists(st.integers(0, 5000), max_size=40))
def test_injected_usage_round_trip_legacy_completions(cuts: list[int]) -> None:
    estimate = PROVIDER.estimate("/v1/completions", body(prompt="x", stream=True), DEFAULT)
    forwarded, usage = observe(estimate, split(legacy_stream(True), cuts), "text/event-stream")
    assert forwarded == legacy_stream(False)
    assert usage == Usage(4, 3)


def test_stripped_stream_is_what_the_sdk_expects() -> None:
    estimate = PROVIDER.estimate(CHAT, body(messages=[], stream=True), DEFAULT)
    forwarded, _ = observe(estimate, [chat_stream(True)], "text/event-stream")
    payloads = [line[6:] for line in forwarded.split(b"\n") if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert all(c.choices and c.usage is None for c in chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == "Héllo 👋 世界! How can I help?"
    )


@given(st.lists(st.integers(0, 5000), max_size=40))
def test_client_requested_usage_passes_byte_for_byte(cuts: list[int]) -> None:
    request = body(messages=[], stream=True, stream_options={"include_usage": True})
    estimate = PROVIDER.estimate(CHAT, request, DEFAULT)
    assert not estimate.injected_usage
    observer = PROVIDER.observer(estimate, 200, "text/event-stream")
    assert observer is not None
    stream = chat_stream(True)
    for chunk in split(stream, cuts):
        assert observer.feed(chunk) == chunk  # forwarded at once, unchanged
    assert observer.close() == b""
    assert observer.usage == Usage(19, 10)


def test_stripping_leaves_unusual_chunks_alone() -> None:
    estimate = PROVIDER.estimate(CHAT, body(messages=[], stream=True), DEFAULT)
    stream = (
        b'event: other\ndata: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'  # named event: kept
        b'data: {"usage":null}\n\n'  # no comma to remove: kept
        b'data: {"a":"x","usage" : null,"b":1}\n\n'  # spaced: removed exactly
        b'data: {"a":1,"usage":null,"n":{"usage":null}}\n\n'  # the top-level one goes
        b'data: {"a":1,"usage":null,"n":{"b":2,"usage":null}}\n\n'  # ambiguous: kept
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )
    forwarded, usage = observe(estimate, [stream], "text/event-stream")
    assert forwarded == (
        b'event: other\ndata: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
        b'data: {"usage":null}\n\n'
        b'data: {"a":"x","b":1}\n\n'
        b'data: {"a":1,"n":{"usage":null}}\n\n'
        b'data: {"a":1,"usage":null,"n":{"b":2,"usage":null}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage == Usage(2, 3)


# --- usage from responses ------------------------------------------------------------------


@given(st.lists(st.integers(0, 20_000), max_size=40))
def test_responses_api_stream_usage_any_split(cuts: list[int]) -> None:
    estimate = PROVIDER.estimate("/v1/responses", body(input="hi", stream=True), DEFAULT)
    stream = responses_stream()
    forwarded, usage = observe(estimate, split(stream, cuts), "text/event-stream; charset=utf-8")
    assert forwarded == stream
    assert usage == Usage(36, 87)


@pytest.mark.parametrize(
    ("response", "usage"),
    [
        ('{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":'
         '{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":'
         + _CHAT_USAGE + "}", Usage(19, 10)),
        ('{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],'
         '"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}',
         Usage(8, 0)),
        (_RESPONSE.format(status="completed", output=f"[{_MESSAGE}]", usage=_RESPONSE_USAGE),
         Usage(36, 87)),
        ('{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}', None),
        ('{"usage": {"prompt_tokens": 5, "completion_tokens": ', None),
    ],
)  # fmt: skip
def test_json_response_usage(response: str, usage: Usage | None) -> None:
    estimate = PROVIDER.estimate(CHAT, body(messages=[]), DEFAULT)
    data = response.encode()
    forwarded, seen = observe(estimate, split(data, [1, 10, 100]), "application/json")
    assert forwarded == data
    assert seen == usage


@pytest.mark.parametrize(
    ("fields", "usage"),
    [
        ({"prompt_tokens": -5, "completion_tokens": 7}, Usage(0, 7)),
        ({"prompt_tokens": 1.5, "completion_tokens": "7"}, None),
        ({"prompt_tokens": True, "completion_tokens": 2}, Usage(0, 2)),
        ({"prompt_tokens": 10**12, "completion_tokens": 1}, Usage(MAX_USAGE_TOKENS, 1)),
        ({"prompt_tokens": None}, None),
    ],
)
def test_absurd_usage_is_ignored_or_clamped_with_a_warning(
    fields: dict[str, object], usage: Usage | None
) -> None:
    estimate = PROVIDER.estimate(CHAT, body(messages=[]), DEFAULT)
    data = msgspec.json.encode({"choices": [], "usage": fields})
    with capture_logs() as logs:
        _, seen = observe(estimate, [data], "application/json")
        _, streamed = observe(estimate, [b"data: " + data + b"\n\n"], "text/event-stream")
    assert seen == streamed == usage
    if any(v is not None for v in fields.values()):
        assert any(log["log_level"] == "warning" for log in logs)


def test_non_body_content_types_are_not_observed() -> None:
    estimate = PROVIDER.estimate(CHAT, b"{}", DEFAULT)
    assert PROVIDER.observer(estimate, 200, "text/plain") is None
    assert PROVIDER.observer(estimate, 204, None) is None
