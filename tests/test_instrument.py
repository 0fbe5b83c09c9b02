"""Apps that call the provider SDK themselves: instrumented httpx/httpx2 clients
charge the usage of their calls to the metered request they run in."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import HTMLResponse, JSONResponse

from tests.test_sdk_fakes import (
    ANTHROPIC_START_USAGE,
    ANTHROPIC_TOTAL,
    CHAT_USAGE,
    USER,
    FakeUpstream,
    StreamingASGITransport,
    chat_completion,
    firewall,
    http_client,
    settled,
)
from tokenfirewall import MemoryStorage, record_usage
from tokenfirewall.context import Meter, bind, unbind
from tokenfirewall.instrument import (
    AsyncTokenFirewallTransport,
    TokenFirewallTransport,
    instrument_httpx,
)

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
TOTAL = CHAT_USAGE["total_tokens"]


def upstream_sdk(upstream: FakeUpstream) -> openai.AsyncOpenAI:
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=upstream))
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        http_client=instrument_httpx(client),
        max_retries=0,
    )


async def ask(app: FastAPI, path: str = "/ask") -> tuple[int, str, MemoryStorage]:
    storage = MemoryStorage()
    async with http_client(firewall(app, storage)) as client:
        r = await client.post(path, headers={"x-user-id": USER})
    return r.status_code, r.text, storage


async def test_html_app_is_charged_the_sdk_usage() -> None:
    sdk = upstream_sdk(FakeUpstream())
    api = FastAPI()
    reported: list[int] = []

    @api.post("/ask")
    async def handler() -> HTMLResponse:
        completion = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert completion.usage is not None
        reported.append(completion.usage.total_tokens)
        return HTMLResponse(f"<p>{completion.choices[0].message.content}</p>")

    status, text, storage = await ask(api)
    assert status == 200
    assert text.startswith("<p>Hé")
    assert (await settled(storage)).used == reported[0] == TOTAL


async def test_streamed_sdk_call_is_counted_and_injection_is_invisible() -> None:
    upstream = FakeUpstream()
    sdk = upstream_sdk(upstream)
    api = FastAPI()
    chunks: list[Any] = []

    @api.post("/ask")
    async def handler() -> HTMLResponse:
        stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks.extend([chunk async for chunk in stream])
        return HTMLResponse("<p>done</p>")

    _, _, storage = await ask(api)
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert len(chunks) == 6
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert (await settled(storage)).used == TOTAL


async def test_a_stream_closed_early_counts_what_was_seen() -> None:
    # A streaming transport, so the rest of the stream is never delivered.
    gate = asyncio.Event()
    upstream = FakeUpstream(gate)
    client = httpx2.AsyncClient(transport=StreamingASGITransport(upstream))
    sdk = anthropic.AsyncAnthropic(
        api_key="k",
        base_url="http://api.anthropic.test",
        max_retries=0,
        http_client=instrument_httpx(client, provider="anthropic"),
    )
    api = FastAPI()

    @api.post("/ask")
    async def handler() -> HTMLResponse:
        stream = await sdk.messages.create(
            model="claude-sonnet-4-5", max_tokens=500, messages=MESSAGES, stream=True
        )
        first = await stream.__anext__()
        gate.set()  # the upstream's next send finds the SDK gone
        await stream.close()
        return HTMLResponse(f"<p>{first.type}</p>")

    with anyio.fail_after(5):
        status, text, storage = await ask(api)
    assert (status, text) == (200, "<p>message_start</p>")
    assert upstream.sent_events == 1
    assert (await settled(storage)).used == sum(ANTHROPIC_START_USAGE.values())


async def test_sync_sdk_in_a_sync_endpoint() -> None:
    # Starlette runs sync endpoints in a worker thread with a copy of the context.
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json=chat_completion())

    client = httpx2.Client(transport=TokenFirewallTransport(httpx2.MockTransport(answer)))
    sdk = openai.OpenAI(
        api_key="k", base_url="http://api.openai.test/v1", http_client=client, max_retries=0
    )
    api = FastAPI()

    @api.post("/ask")
    def handler() -> HTMLResponse:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return HTMLResponse("<p>ok</p>")

    status, _, storage = await ask(api)
    assert status == 200
    assert (await settled(storage)).used == TOTAL


async def test_plain_httpx_client_is_instrumented_too() -> None:
    upstream = httpx.AsyncClient(
        transport=AsyncTokenFirewallTransport(httpx.ASGITransport(app=FakeUpstream())),
        base_url="http://api.openai.test",
    )
    api = FastAPI()

    @api.post("/ask")
    async def handler() -> HTMLResponse:
        r = await upstream.post("/v1/chat/completions", json={"messages": MESSAGES})
        return HTMLResponse(f"<p>{r.status_code}</p>")

    status, _, storage = await ask(api)
    assert status == 200
    assert (await settled(storage)).used == TOTAL


async def test_precedence_reported_over_instrumented_over_parsed() -> None:
    sdk = upstream_sdk(FakeUpstream())
    api = FastAPI()

    @api.post("/twice")
    async def twice() -> JSONResponse:
        # Proxies one answer (parsed: 29) but made two calls (instrumented: 58).
        for _ in range(2):
            completion = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return JSONResponse(completion.model_dump())

    @api.post("/reported")
    async def reported() -> JSONResponse:
        completion = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        record_usage(5)
        record_usage(2)
        return JSONResponse(completion.model_dump())

    _, _, storage = await ask(api, "/twice")
    assert (await settled(storage)).used == 2 * TOTAL
    _, _, storage = await ask(api, "/reported")
    assert (await settled(storage)).used == 7


async def test_outside_a_metered_request_the_wrapper_only_forwards() -> None:
    upstream = FakeUpstream()
    sdk = upstream_sdk(upstream)
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "stream_options" not in upstream.requests[0]
    assert len(chunks) == 6


async def test_failed_call_charges_nothing_and_usage_after_settlement_is_ignored() -> None:
    upstream = FakeUpstream()
    upstream.status = 500
    sdk = upstream_sdk(upstream)
    meter = Meter(user_id=USER, reservation_id="r", period="2026-12", reserved=10)
    token = bind(meter)
    try:
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert meter.instrumented is None
        upstream.status = 200
        meter.settled = True
        await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert meter.instrumented is None
    finally:
        unbind(token)


def test_instrument_httpx_wraps_every_transport_once() -> None:
    client = httpx2.AsyncClient(mounts={"http://proxied": httpx2.AsyncHTTPTransport()})
    instrument_httpx(instrument_httpx(client))
    transports = [client._transport, *client._mounts.values()]
    assert all(isinstance(t, AsyncTokenFirewallTransport) for t in transports)
    assert not any(isinstance(t.inner, AsyncTokenFirewallTransport) for t in transports)
    with pytest.raises(TypeError):
        instrument_httpx(object())


@pytest.mark.parametrize("injected", [True, False])
async def test_anthropic_total_through_instrumented_client(injected: bool) -> None:
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=FakeUpstream()))
    sdk = anthropic.AsyncAnthropic(
        api_key="k",
        base_url="http://api.anthropic.test",
        max_retries=0,
        http_client=instrument_httpx(client, provider="anthropic", inject_usage=injected),
    )
    meter = Meter(user_id=USER, reservation_id="r", period="2026-12", reserved=10)
    token = bind(meter)
    try:
        async with sdk.messages.stream(
            model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES
        ) as stream:
            await stream.get_final_message()
    finally:
        unbind(token)
    assert meter.instrumented == ANTHROPIC_TOTAL
