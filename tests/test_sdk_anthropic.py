"""The real `anthropic` SDK as a client of the middleware, in front of a fake
upstream speaking the Messages API: what is charged is what the SDK reports."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.test_sdk_fakes import (
    ANTHROPIC_TOTAL,
    FakeUpstream,
    anthropic_client,
    firewall,
    settled,
)
from tokenfirewall import MemoryStorage, RedisStorage, Storage

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


def billed(usage: anthropic.types.Usage) -> int:
    """Input, cache writes, cache reads and output: everything Anthropic bills."""
    return (
        usage.input_tokens
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
        + usage.output_tokens
    )


async def test_message_is_charged_its_usage_including_cache_tokens() -> None:
    storage = MemoryStorage()
    async with anthropic_client(firewall(FakeUpstream(), storage, "anthropic")) as sdk:
        message = await sdk.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES
        )
    assert message.usage.cache_read_input_tokens  # the fake does report cache tokens
    assert billed(message.usage) == ANTHROPIC_TOTAL
    assert (await settled(storage)).used == billed(message.usage)


async def _streamed(storage: Storage) -> anthropic.types.Message:
    app = firewall(FakeUpstream(), storage, "anthropic")
    async with (
        anthropic_client(app) as sdk,
        sdk.messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES) as stream,
    ):
        return await stream.get_final_message()


async def test_streamed_message_is_charged_start_and_delta_usage() -> None:
    storage = MemoryStorage()
    message = await _streamed(storage)
    assert message.usage.output_tokens > 1  # from message_delta, not message_start
    assert (await settled(storage)).used == billed(message.usage)


@pytest.mark.parametrize("mode", ["direct"])
async def test_streamed_message_is_charged_on_redis(redis_url: str, mode: str) -> None:
    storage = RedisStorage.from_url(redis_url, mode=mode)
    try:
        message = await _streamed(storage)
        assert (await settled(storage)).used == billed(message.usage) == ANTHROPIC_TOTAL
    finally:
        await storage.aclose()


async def test_overloaded_upstream_settles_zero() -> None:
    storage = MemoryStorage()
    upstream = FakeUpstream()
    upstream.status = 529
    async with anthropic_client(firewall(upstream, storage, "anthropic")) as sdk:
        with pytest.raises(anthropic.APIStatusError):
            await sdk.messages.create(model="claude-sonnet-4-5", max_tokens=9, messages=MESSAGES)
    assert (await settled(storage)).used == 0
