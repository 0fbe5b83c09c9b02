"""Fake OpenAI and Anthropic upstreams speaking the real wire formats, and a
streaming ASGI transport for httpx2 (its own ASGITransport buffers the whole
response, which would hide any buffering or delay in the middleware).

Shared by the test_sdk_*, test_streaming_* and test_instrument* modules; the
tests at the bottom check that the fakes behave like the real APIs.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anthropic
import anyio
import httpx2
import openai
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tokenfirewall import Storage, TokenFirewall, UserBudget
from tokenfirewall.storage.base import PeriodSnapshot

Scope = dict[str, Any]
Message = dict[str, Any]

CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 31,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 43,
}
EMBEDDING_USAGE = {"prompt_tokens": 8, "total_tokens": 8}
ANTHROPIC_START_USAGE = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 5,
    "cache_read_input_tokens": 3,
    "output_tokens": 1,
}
ANTHROPIC_OUTPUT = 13
ANTHROPIC_TOTAL = 21 + 5 + 3 + ANTHROPIC_OUTPUT
DELTAS = ["Hé", "llo", " 👋 世界", "!"]


def sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {text}\n\n".encode()


def chat_chunks(include_usage: bool) -> list[bytes]:
    """The events of a streamed chat completion, exactly as OpenAI orders them."""
    head = {
        "id": "chatcmpl-B9M",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_f9f4fb6dbf",
    }
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": text} for text in DELTAS]
    choices = [[{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}] for d in deltas]
    choices.append([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    events = [sse({**head, "choices": c, **extra}) for c in choices]
    if include_usage:
        events.append(sse({**head, "choices": [], "usage": CHAT_USAGE}))
    return [*events, sse("[DONE]")]


def chat_completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9M",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(DELTAS), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": CHAT_USAGE,
        "system_fingerprint": "fp_f9f4fb6dbf",
    }


def _response(status: str, usage: object) -> dict[str, Any]:
    output = []
    if status == "completed":
        text = {"type": "output_text", "text": "".join(DELTAS), "annotations": []}
        output = [
            {
                "id": "msg_1",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [text],
            }
        ]
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1741569952,
        "status": status,
        "model": "gpt-4o-2024-08-06",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def responses_events() -> list[bytes]:
    events = [
        sse(
            {"type": "response.created", "response": _response("in_progress", None)},
            "response.created",
        )
    ]
    for text in DELTAS:
        delta = {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": text,
        }
        events.append(sse(delta, "response.output_text.delta"))
    done = {"type": "response.completed", "response": _response("completed", RESPONSES_USAGE)}
    events.append(sse(done, "response.completed"))
    return [sse_with_seq(e, i) for i, e in enumerate(events)]


def sse_with_seq(event: bytes, seq: int) -> bytes:
    head, _, data = event.partition(b"data: ")
    doc = json.loads(data)
    doc["sequence_number"] = seq
    return head + b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def anthropic_message(output_tokens: int = ANTHROPIC_OUTPUT) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "".join(DELTAS)}],
        "model": "claude-sonnet-4-5",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {**ANTHROPIC_START_USAGE, "output_tokens": output_tokens},
    }


def anthropic_events() -> list[bytes]:
    start = {**anthropic_message(1), "content": [], "stop_reason": None}
    events = [
        sse({"type": "message_start", "message": start}, "message_start"),
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        sse({"type": "ping"}, "ping"),
    ]
    for text in DELTAS:
        delta = {"type": "text_delta", "text": text}
        events.append(
            sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
        )
    events += [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": ANTHROPIC_OUTPUT},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


class FakeUpstream:
    """An ASGI app answering like OpenAI or Anthropic.

    `gate`, if set, is awaited after the first event of a stream, so a test
    can prove the first event reached the client before the stream ended.
    `status`/`error` make it fail like the real API; `usage_override`
    replaces the usage object of a JSON answer (for hostile-upstream tests).
    """

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.usage_override: object = ...
        self.sent_events = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        doc = json.loads(await read_body(receive) or b"{}")
        self.requests.append(doc)
        if self.status != 200:
            error = {"type": "error", "error": {"type": "api_error", "message": "overloaded"}}
            await _json(send, self.status, error)
            return
        path = scope["path"]
        stream = doc.get("stream") is True
        if path.endswith("/chat/completions"):
            include = (doc.get("stream_options") or {}).get("include_usage") is True
            if stream:
                await self._stream(send, chat_chunks(include))
            else:
                await _json(send, 200, self._usage(chat_completion()))
        elif path.endswith("/responses"):
            if stream:
                await self._stream(send, responses_events())
            else:
                await _json(send, 200, self._usage(_response("completed", RESPONSES_USAGE)))
        elif path.endswith("/embeddings"):
            data = [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}]
            body = {
                "object": "list",
                "data": data,
                "model": doc.get("model"),
                "usage": EMBEDDING_USAGE,
            }
            await _json(send, 200, self._usage(body))
        elif path.endswith("/messages"):
            if stream:
                await self._stream(send, anthropic_events())
            else:
                await _json(send, 200, self._usage(anthropic_message()))
        else:
            await _json(send, 404, {"error": "not found"})

    def _usage(self, body: dict[str, Any]) -> dict[str, Any]:
        return body if self.usage_override is ... else {**body, "usage": self.usage_override}

    async def _stream(self, send: Any, events: list[bytes]) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, event in enumerate(events):
            await send({"type": "http.response.body", "body": event, "more_body": True})
            self.sent_events += 1
            if index == 0 and self.gate is not None:
                await self.gate.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(send: Any, status: int, body: object) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class _ResponseBody(httpx2.AsyncByteStream):
    def __init__(
        self,
        messages: MemoryObjectReceiveStream[Message],
        task: asyncio.Task[None],
        gone: asyncio.Event,
    ) -> None:
        self._messages = messages
        self._task = task
        self._gone = gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for message in self._messages:
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                break
        await self._task  # surfaces the app's exception, like a real server's 500

    async def aclose(self) -> None:
        if self._task.done():
            return
        # The client hung up: the app's next send fails, as under uvicorn.
        self._gone.set()
        with anyio.fail_after(5):
            await asyncio.gather(self._task, return_exceptions=True)


class StreamingASGITransport(httpx2.AsyncBaseTransport):
    """Runs the ASGI app concurrently and hands each body chunk to the client
    as soon as the app sends it; closing the response early disconnects."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        sender, messages = anyio.create_memory_object_stream[Message](math.inf)
        gone = asyncio.Event()
        task = asyncio.create_task(self._run(scope, body, sender, gone))
        start = await messages.receive()
        return httpx2.Response(
            start["status"],
            headers=start.get("headers", []),
            stream=_ResponseBody(messages, task, gone),
        )

    async def _run(
        self,
        scope: Scope,
        body: bytes,
        sender: MemoryObjectSendStream[Message],
        gone: asyncio.Event,
    ) -> None:
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if gone.is_set():
                raise OSError("client disconnected")
            await sender.send(message)

        async with sender:
            await self.app(scope, receive, send)


NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
PERIOD = "2026-12"
USER = "alice"


def firewall(
    app: Any, storage: Storage, provider: Any = "openai", limit: int = 10**6
) -> TokenFirewall:
    budget = UserBudget(
        extract_user_id=lambda r: r.headers.get("x-user-id"), monthly_token_limit=limit
    )
    return TokenFirewall(
        app, user_budget=budget, provider=provider, storage=storage, clock=lambda: NOW
    )


async def settled(storage: Storage, user: str = USER) -> PeriodSnapshot:
    """The user's period once every reservation has been settled."""
    snap = await storage.snapshot(user, PERIOD)
    assert snap is not None
    assert snap.open_reservations == 0
    assert snap.charged == snap.used
    return snap


def http_client(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=StreamingASGITransport(app), base_url="http://gw")


def openai_client(app: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://gw/v1",
        http_client=http_client(app),
        default_headers={"x-user-id": USER},
        max_retries=0,
    )


def anthropic_client(app: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="sk-ant-test",
        base_url="http://gw",
        http_client=http_client(app),
        default_headers={"x-user-id": USER},
        max_retries=0,
    )


async def test_fake_openai_honours_include_usage() -> None:
    upstream = FakeUpstream()
    transport = StreamingASGITransport(upstream)
    async with httpx2.AsyncClient(transport=transport, base_url="http://up") as client:
        plain = await client.post("/v1/chat/completions", json={"stream": True})
        usage = await client.post(
            "/v1/chat/completions",
            json={"stream": True, "stream_options": {"include_usage": True}},
        )
    assert plain.content == b"".join(chat_chunks(False))
    assert b'"usage"' not in plain.content
    assert usage.content.count(b'"usage":null') == 6
    assert b'"choices":[],"usage":{"prompt_tokens":19' in usage.content


async def test_streaming_transport_delivers_before_the_app_finishes() -> None:
    gate = asyncio.Event()
    upstream = FakeUpstream(gate)
    transport = StreamingASGITransport(upstream)
    async with httpx2.AsyncClient(transport=transport, base_url="http://up") as client:
        with anyio.fail_after(5):
            async with client.stream("POST", "/v1/messages", json={"stream": True}) as r:
                chunks = r.aiter_raw()
                first = await chunks.__anext__()
                assert upstream.sent_events == 1
                gate.set()
                rest = b"".join([c async for c in chunks])
    assert first + rest == b"".join(anthropic_events())
