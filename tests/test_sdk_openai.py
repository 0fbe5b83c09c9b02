"""The real `openai` SDK as a client of the middleware, in front of a fake
upstream speaking OpenAI's wire format: what is charged is what the SDK reports."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from structlog.testing import capture_logs

from tests.test_sdk_fakes import (
    CHAT_USAGE,
    EMBEDDING_USAGE,
    RESPONSES_USAGE,
    USER,
    FakeUpstream,
    firewall,
    http_client,
    openai_client,
    settled,
)
from tokenfirewall import MemoryStorage, RedisStorage
from tokenfirewall.providers import MAX_USAGE_TOKENS

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


async def test_chat_completion_is_charged_its_usage() -> None:
    storage = MemoryStorage()
    async with openai_client(firewall(FakeUpstream(), storage)) as sdk:
        completion = await sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=50
        )
    assert completion.usage is not None
    assert completion.usage.total_tokens == CHAT_USAGE["total_tokens"]
    assert (await settled(storage)).used == completion.usage.total_tokens


async def test_streamed_chat_with_include_usage_is_charged_the_final_chunk() -> None:
    storage = MemoryStorage()
    upstream = FakeUpstream()
    async with openai_client(firewall(upstream, storage)) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []  # the client asked for it: it is not stripped
    assert (await settled(storage)).used == usage.total_tokens


async def _chunks(sdk: openai.AsyncOpenAI) -> list[dict[str, Any]]:
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    return [chunk.model_dump() async for chunk in stream]


async def test_injected_include_usage_is_invisible_to_the_sdk() -> None:
    storage = MemoryStorage()
    upstream = FakeUpstream()
    async with openai_client(FakeUpstream()) as direct:
        expected = await _chunks(direct)
    async with openai_client(firewall(upstream, storage)) as sdk:
        seen = await _chunks(sdk)
    assert seen == expected
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in seen)
    # The middleware asked for usage, and charged what the upstream reported.
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert (await settled(storage)).used == CHAT_USAGE["total_tokens"]


async def test_injected_stream_is_charged_on_redis(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, mode="direct")
    try:
        async with openai_client(firewall(FakeUpstream(), storage)) as sdk:
            await _chunks(sdk)
        assert (await settled(storage)).used == CHAT_USAGE["total_tokens"]
    finally:
        await storage.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_api_is_charged_its_usage(stream: bool) -> None:
    storage = MemoryStorage()
    async with openai_client(firewall(FakeUpstream(), storage)) as sdk:
        if stream:
            events = [
                e
                async for e in await sdk.responses.create(
                    model="gpt-4o", input="Say hello", stream=True, max_output_tokens=64
                )
            ]
            assert events[-1].type == "response.completed"
            usage = events[-1].response.usage
        else:
            response = await sdk.responses.create(model="gpt-4o", input="Say hello")
            usage = response.usage
    assert usage is not None
    assert usage.total_tokens == RESPONSES_USAGE["total_tokens"]
    assert (await settled(storage)).used == usage.total_tokens


async def test_embeddings_are_charged_their_usage() -> None:
    storage = MemoryStorage()
    async with openai_client(firewall(FakeUpstream(), storage)) as sdk:
        result = await sdk.embeddings.create(model="text-embedding-3-small", input="hello")
    assert result.usage.total_tokens == EMBEDDING_USAGE["total_tokens"]
    assert (await settled(storage)).used == result.usage.total_tokens


async def test_failed_upstream_settles_zero_and_releases_the_reservation() -> None:
    storage = MemoryStorage()
    upstream = FakeUpstream()
    upstream.status = 529
    async with openai_client(firewall(upstream, storage)) as sdk:
        with pytest.raises(openai.APIStatusError):
            await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    snap = await settled(storage)
    assert snap.used == 0


@pytest.mark.parametrize(
    ("usage", "charged"),
    [
        ({"prompt_tokens": -5, "completion_tokens": 7}, 7),
        ({"prompt_tokens": 10**30, "completion_tokens": 1}, MAX_USAGE_TOKENS),
        ({"prompt_tokens": 2.5, "completion_tokens": "many"}, None),
        ({"prompt_tokens": True, "completion_tokens": None}, None),
        ([1, 2, 3], None),
        ("lots", None),
    ],
)
async def test_absurd_usage_is_clamped_or_ignored_never_a_500(
    usage: object, charged: int | None
) -> None:
    storage = MemoryStorage()
    upstream = FakeUpstream()
    upstream.usage_override = usage
    app = firewall(upstream, storage, limit=2 * MAX_USAGE_TOKENS)
    async with http_client(app) as client:
        with capture_logs() as logs:
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10},
                headers={"x-user-id": USER},
            )
    assert r.status_code == 200
    assert r.json()["usage"] == usage  # the client still sees the upstream's answer
    reservation = 2 * MAX_USAGE_TOKENS - int(r.headers["x-tokenfirewall-remaining"])
    # Unusable usage falls back to the reservation, the side that never overspends.
    assert (await settled(storage)).used == (reservation if charged is None else charged)
    if isinstance(usage, dict):
        assert any(e["event"].startswith("provider_usage_") for e in logs)
