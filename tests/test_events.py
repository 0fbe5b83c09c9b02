"""The subscriber API and the batch script's agreement with settle.lua."""

from __future__ import annotations

import random

import anyio
import pytest
import redis

from tokenfirewall.config import Policy
from tokenfirewall.errors import ConfigurationError
from tokenfirewall.events import subscribe
from tokenfirewall.keys import Keys
from tokenfirewall.messages import (
    BudgetExceeded,
    BudgetThreshold,
    PeriodClosed,
    Settled,
    encode,
)
from tokenfirewall.storage.base import ReserveRequest
from tokenfirewall.storage.redis import RedisStorage
from worker import WorkerConfig
from worker.closing import PeriodCloser
from worker.codec import Entry, Valid, check
from worker.duty import Duty
from worker.metrics import Metrics
from worker.publisher import Publisher
from worker.reconcile import Reconciler
from worker.webhooks import sign

KEYS = Keys()


def publish(url: str, *events: object) -> None:
    client = redis.Redis.from_url(url)
    for event in events:
        client.xadd(KEYS.events, {"m": encode(event)})  # type: ignore[arg-type]


def exceeded(user: str) -> BudgetExceeded:
    return BudgetExceeded(user=user, period="2026-03", used=100, limit=100)


async def test_subscriber_filters_kinds_and_acks_after_the_body(redis_url: str) -> None:
    async with subscribe(redis_url, group="g", consumer="a", kinds={"budget.exceeded"},
                         block_ms=50) as events:  # fmt: skip
        publish(redis_url, BudgetThreshold(user="u1", period="2026-03", percent=80, used=80,
                                           limit=100), exceeded("u1"), exceeded("u2"))
        first = await anext(events)
        client = redis.Redis.from_url(redis_url)
        # Held by the loop body: delivered, not acknowledged yet.
        assert client.xpending(KEYS.events, "g")["pending"] >= 1
        second = await anext(events)
    assert [first.user, second.user] == ["u1", "u2"]
    assert isinstance(first, BudgetExceeded)
    assert client.xpending(KEYS.events, "g")["pending"] == 0  # clean exit acked the last


async def test_event_whose_handler_crashed_is_delivered_again(redis_url: str) -> None:
    publish_after = exceeded("crashy")
    subscription = subscribe(redis_url, group="g", consumer="a", block_ms=50)
    async def crash() -> None:
        async with subscription:
            publish(redis_url, publish_after)
            async for _event in subscription:
                raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError):
        await crash()
    async with subscribe(redis_url, group="g", consumer="a", block_ms=50) as again:
        with anyio.fail_after(5):
            event = await anext(again)
    assert event == publish_after


async def test_two_groups_each_see_every_event(redis_url: str) -> None:
    async with subscribe(redis_url, group="one", block_ms=50) as one, \
            subscribe(redis_url, group="two", block_ms=50) as two:  # fmt: skip
        publish(redis_url, exceeded("x"))
        with anyio.fail_after(5):
            assert (await anext(one)).user == (await anext(two)).user == "x"


def test_unknown_kinds_are_rejected() -> None:
    with pytest.raises(ConfigurationError):
        subscribe("redis://localhost:1/0", kinds={"budget.exceded"})


def test_webhook_signature_is_hmac_sha256_of_the_raw_body() -> None:
    import hashlib
    import hmac

    body = encode(exceeded("w"))
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body) == f"sha256={expected}"


async def test_batch_script_matches_settle_lua_one_by_one(redis_url: str) -> None:
    """settle_many (what the worker runs) and settle.lua (direct mode) agree exactly."""
    rng = random.Random(3)
    pol = Policy(monthly_limit=5000, rollover=True, max_carryover=2000)
    plan = []
    for n in range(400):
        user, period = f"u{rng.randrange(8)}", rng.choice(["2026-01", "2026-02"])
        plan.append((user, period, f"r{n}", rng.choice([0, 50, 300]), rng.randint(0, 400)))
    results = {}
    for prefix in ("direct", "batch"):
        storage = RedisStorage.from_url(redis_url, prefix=prefix, mode="direct")
        messages = []
        async with storage:
            for user, period, rid, reserved, actual in plan:
                if reserved:
                    await storage.reserve(ReserveRequest(user, period, reserved, pol, rid,
                                                         2**52, 0))  # fmt: skip
                messages.append(Settled(rid=rid, user=user, period=period, reserved=reserved,
                                        actual=actual, limit=5000, rollover=True, cap=2000))
            messages += messages[:50]  # redelivered: no effect
            if prefix == "direct":
                for message in messages:
                    await storage.apply(message)
            else:
                await _apply_batch(storage.client, prefix, messages)
            results[prefix] = await _state(storage, plan)
    assert results["direct"] == results["batch"]


async def _apply_batch(client: object, prefix: str, messages: list[Settled]) -> None:
    keys, metrics = Keys(prefix), Metrics()
    config = WorkerConfig(prefix=prefix, consumer="c")
    publisher = Publisher(client, keys, metrics, maxlen=1000)
    duty = Duty(client, keys, config, metrics, publisher, _january)
    reconciler = Reconciler(duty, PeriodCloser(duty))
    items = [check(Entry("s", b"1-0", {b"m": encode(m)})) for m in messages]
    valid = [item for item in items if isinstance(item, Valid)]
    for start in range(0, len(valid), 37):  # several batches, uneven sizes
        assert await reconciler.apply(valid[start : start + 37]) == []


def _january() -> object:
    from datetime import UTC, datetime

    return datetime(2026, 1, 15, tzinfo=UTC)


async def _state(storage: RedisStorage, plan: list[tuple[str, str, str, int, int]]) -> dict:
    state = {}
    for user, period in {(u, p) for u, p, *_ in plan}:
        state[user, period] = await storage.snapshot(user, period)
    return state


def test_period_closed_event_round_trips_as_json() -> None:
    event = PeriodClosed(user="u", period="2026-01", used=1, limit=2, next_period="2026-02",
                         next_bonus=1)  # fmt: skip
    assert b'"type":"period.closed"' in encode(event)
