"""Streams through the middleware: undelayed, byte-exact, settled on disconnect."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_sdk_fakes import (
    ANTHROPIC_START_USAGE,
    CHAT_USAGE,
    USER,
    FakeUpstream,
    anthropic_client,
    chat_chunks,
    firewall,
    http_client,
    openai_client,
    read_body,
    settled,
)
from tokenfirewall import MemoryStorage
from tokenfirewall.providers import GenericProvider, ResponseObserver

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
CHAT = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 40}
DEADLINE = 5


async def test_first_chunk_reaches_the_sdk_before_the_upstream_finishes() -> None:
    # The upstream holds its stream open after the first event until the test
    # has that event: any buffering in the middleware would deadlock here.
    gate = asyncio.Event()
    upstream = FakeUpstream(gate)
    storage = MemoryStorage()
    async with openai_client(firewall(upstream, storage)) as sdk:
        with anyio.fail_after(DEADLINE):
            stream = await sdk.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
            first = await stream.__anext__()
            assert upstream.sent_events == 1
            gate.set()
            rest = [chunk async for chunk in stream]
    assert first.choices[0].delta.role == "assistant"
    assert len(rest) == 5
    assert (await settled(storage)).used == CHAT_USAGE["total_tokens"]


async def test_injected_stream_is_byte_identical_to_the_uninjected_one() -> None:
    upstream = FakeUpstream()
    async with (
        http_client(firewall(upstream, MemoryStorage())) as client,
        client.stream("POST", "/v1/chat/completions", json=CHAT, headers={"x-user-id": USER}) as r,
    ):
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert raw == b"".join(chat_chunks(include_usage=False))
    assert "content-length" not in r.headers


async def test_rewritten_request_carries_its_true_content_length() -> None:
    seen: list[tuple[int, int]] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        declared = dict(scope["headers"])[b"content-length"]
        seen.append((int(declared), len(body)))
        await FakeUpstream()(scope, _replayed(body), send)

    async with http_client(firewall(upstream, MemoryStorage())) as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-user-id": USER})
    assert r.status_code == 200
    declared, actual = seen[0]
    assert declared == actual > len(json.dumps(CHAT, separators=(",", ":")))


def _replayed(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def test_disconnect_before_any_usage_settles_the_reservation() -> None:
    gate = asyncio.Event()
    upstream = FakeUpstream(gate)
    storage = MemoryStorage()
    limit = 10**6
    async with http_client(firewall(upstream, storage, limit=limit)) as client:
        with anyio.fail_after(DEADLINE):
            async with client.stream(
                "POST", "/v1/chat/completions", json=CHAT, headers={"x-user-id": USER}
            ) as r:
                await r.aiter_raw().__anext__()
                reservation = limit - int(r.headers["x-tokenfirewall-remaining"])
                gate.set()  # the upstream's next send finds the client gone
    assert upstream.sent_events < len(chat_chunks(True))
    # OpenAI reports usage only at the end: none was seen, so the whole
    # reservation stays charged (we cannot tell how much was generated).
    assert (await settled(storage)).used == reservation


async def test_disconnect_after_message_start_settles_the_usage_seen() -> None:
    gate = asyncio.Event()
    storage = MemoryStorage()
    upstream = FakeUpstream(gate)
    async with anthropic_client(firewall(upstream, storage, "anthropic")) as sdk:
        with anyio.fail_after(DEADLINE):
            stream = await sdk.messages.create(
                model="claude-sonnet-4-5", max_tokens=500, messages=MESSAGES, stream=True
            )
            first = await stream.__anext__()
            assert first.type == "message_start"
            gate.set()
            await stream.close()
    assert upstream.sent_events < 10
    # message_start's input (with cache tokens) and its output count so far.
    assert (await settled(storage)).used == sum(ANTHROPIC_START_USAGE.values())


def _split_upstream(cuts: list[int]) -> Any:
    """An upstream sending an include_usage stream cut at arbitrary offsets."""
    data = b"".join(chat_chunks(include_usage=True))
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await read_body(receive)
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for start, end in itertools.pairwise(bounds):
            await send({"type": "http.response.body", "body": data[start:end], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=30))
def test_any_upstream_split_reaches_the_client_uninjected(cuts: list[int]) -> None:
    async def run() -> tuple[bytes, int]:
        storage = MemoryStorage()
        async with http_client(firewall(_split_upstream(cuts), storage)) as client:
            r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-user-id": USER})
        return r.content, (await settled(storage)).used

    content, used = anyio.run(run)
    assert content == b"".join(chat_chunks(include_usage=False))
    assert used == CHAT_USAGE["total_tokens"]


class _Broken(ResponseObserver):
    def feed(self, chunk: bytes) -> bytes:
        raise RuntimeError("bug")

    def close(self) -> bytes:
        raise RuntimeError("bug")


class _BuggyProvider(GenericProvider):
    name = "buggy"

    def __init__(self, fail_at_start: bool) -> None:
        self.fail_at_start = fail_at_start

    def observer(self, estimate: Any, status: int, content_type: str | None) -> ResponseObserver:
        if self.fail_at_start:
            raise RuntimeError("bug")
        return _Broken()


@pytest.mark.parametrize("fail_at_start", [True, False])
async def test_a_buggy_custom_provider_never_breaks_the_stream(fail_at_start: bool) -> None:
    storage = MemoryStorage()
    app = firewall(FakeUpstream(), storage, _BuggyProvider(fail_at_start))
    async with http_client(app) as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-user-id": USER})
    assert r.status_code == 200
    assert r.content == b"".join(chat_chunks(include_usage=False))
    assert (await settled(storage)).used == 1024  # no usage known: the reservation
