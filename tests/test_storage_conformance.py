"""One conformance suite, run against every storage backend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tokenfirewall.config import Policy
from tokenfirewall.keys import encode_user_id
from tokenfirewall.messages import Settled
from tokenfirewall.storage import MemoryStorage, RedisStorage, ReserveRequest, Storage

NOW_MS = 1_796_000_000_000  # late 2026
POLICY = Policy(monthly_limit=1000, rollover=True, max_carryover=300)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    if request.param == "memory":
        backend: Storage = MemoryStorage()
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        backend = RedisStorage.from_url(url, mode="direct")
    else:
        urls = request.getfixturevalue("cluster_urls")
        backend = RedisStorage.from_url(urls[0], mode="direct", cluster=True)
    async with backend:
        yield backend


def req(
    user: str,
    estimate: int,
    period: str = "2026-12",
    policy: Policy = POLICY,
    expires_at_ms: int = NOW_MS + 60_000,
    now_ms: int = NOW_MS,
) -> ReserveRequest:
    return ReserveRequest(
        user_id=user,
        period=period,
        estimate=estimate,
        policy=policy,
        reservation_id=uuid.uuid4().hex,
        expires_at_ms=expires_at_ms,
        now_ms=now_ms,
    )


def settled(r: ReserveRequest, actual: int, reserved: int | None = None) -> Settled:
    return Settled(
        rid=r.reservation_id,
        user=r.user_id,
        period=r.period,
        reserved=r.estimate if reserved is None else reserved,
        actual=actual,
        limit=r.policy.monthly_limit,
        rollover=r.policy.rollover,
        cap=r.policy.max_carryover,
    )


async def spend(storage: Storage, user: str, period: str, tokens: int, policy: Policy) -> None:
    r = req(user, tokens, period, policy)
    result = await storage.reserve(r)
    assert result.admitted
    await storage.settle(settled(r, tokens))


async def test_users_are_independent(storage: Storage) -> None:
    assert (await storage.reserve(req("alice", 1000))).admitted
    assert not (await storage.reserve(req("alice", 1))).admitted
    bob = await storage.reserve(req("bob", 1000))
    assert bob.admitted
    assert bob.charged == 1000


async def test_refusal_charges_nothing(storage: Storage) -> None:
    assert (await storage.reserve(req("alice", 600))).admitted
    refused = await storage.reserve(req("alice", 401))
    assert not refused.admitted
    assert refused.charged == 600
    assert refused.first_refusal
    again = await storage.reserve(req("alice", 401))
    assert not again.first_refusal
    fits = await storage.reserve(req("alice", 400))
    assert fits.admitted
    assert fits.charged == 1000
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert snap.charged == 1000


async def test_concurrent_reservations_never_exceed_the_limit(storage: Storage) -> None:
    policy = Policy(monthly_limit=10_000, rollover=False, max_carryover=0)
    results = await asyncio.gather(
        *(storage.reserve(req("hot", 37, policy=policy)) for _ in range(500))
    )
    admitted = sum(r.admitted for r in results)
    assert admitted == 10_000 // 37
    snap = await storage.snapshot("hot", "2026-12")
    assert snap is not None
    assert snap.charged == admitted * 37 <= 10_000
    assert snap.open_reservations == admitted


async def test_settlement_replaces_the_reservation_once(storage: Storage) -> None:
    r = req("alice", 500)
    await storage.reserve(r)
    s = settled(r, 120)
    await storage.settle(s)
    await storage.settle(s)  # redelivered: must change nothing
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.charged, snap.used, snap.open_reservations) == (120, 120, 0)


async def test_unreserved_settlement_applies_once(storage: Storage) -> None:
    # A request admitted while the store was unreachable (fail-open).
    r = req("alice", 0)
    s = settled(r, 77, reserved=0)
    await storage.settle(s)
    await storage.settle(s)
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.charged, snap.used) == (77, 77)


async def test_rollover_is_capped_and_none_in_first_month(storage: Storage) -> None:
    await spend(storage, "alice", "2026-11", 100, POLICY)
    first = await storage.snapshot("alice", "2026-11")
    assert first is not None
    assert first.bonus == 0
    result = await storage.reserve(req("alice", 1, "2026-12"))
    # 900 unused, capped at 300.
    assert (result.bonus, result.limit) == (300, 1300)


async def test_rollover_of_partially_used_month(storage: Storage) -> None:
    await spend(storage, "alice", "2026-11", 800, POLICY)
    result = await storage.reserve(req("alice", 1, "2026-12"))
    assert result.bonus == 200


async def test_rollover_chains_over_idle_months(storage: Storage) -> None:
    policy = Policy(monthly_limit=100, rollover=True, max_carryover=250)
    await spend(storage, "alice", "2026-01", 100, policy)  # nothing unused
    # Feb and Mar idle: Feb bonus 0, Mar bonus min(100, 250), Apr min(200, 250).
    result = await storage.reserve(req("alice", 1, "2026-04", policy))
    assert result.bonus == 200
    await spend(storage, "bob", "2026-01", 100, policy)
    later = await storage.reserve(req("bob", 1, "2026-09", policy))
    assert later.bonus == 250  # the cap bounds the chain


async def test_user_idle_beyond_the_lookback_starts_afresh(storage: Storage) -> None:
    policy = Policy(monthly_limit=100, rollover=True, max_carryover=250)
    await spend(storage, "alice", "2024-11", 10, policy)
    within = await storage.reserve(req("alice", 1, "2026-11", policy))  # 24 months later
    assert within.bonus == 250
    await spend(storage, "bob", "2024-11", 10, policy)
    beyond = await storage.reserve(req("bob", 1, "2026-12", policy))  # 25 months later
    assert beyond.bonus == 0


async def test_rollover_disabled_gives_no_bonus(storage: Storage) -> None:
    policy = Policy(monthly_limit=100, rollover=False, max_carryover=100)
    await spend(storage, "alice", "2026-11", 10, policy)
    assert (await storage.reserve(req("alice", 1, "2026-12", policy))).bonus == 0


async def test_provisional_bonus_counts_open_reservations(storage: Storage) -> None:
    # An unsettled November request still counts against November's unused.
    await storage.reserve(req("alice", 900, "2026-11"))
    result = await storage.reserve(req("alice", 1, "2026-12"))
    assert result.bonus == 100


async def test_policy_is_stored_with_the_period(storage: Storage) -> None:
    await storage.reserve(req("alice", 10))
    bigger = Policy(monthly_limit=5000, rollover=True, max_carryover=0)
    result = await storage.reserve(req("alice", 2000, policy=bigger))
    assert not result.admitted
    assert result.monthly_limit == 1000


HOSTILE_IDS = [
    "a}b",
    "{a}",
    "a}:2026-12",
    "alice",
    "x" * 10_000,
    "x" * 10_001,
    "ünïcødé",
    "line\nbreak",
    "with space",
    "~bYWxpY2U",
    "~alice",
    "",
    "\x00",
]


async def test_hostile_ids_are_independent(storage: Storage) -> None:
    for i, user in enumerate(HOSTILE_IDS):
        result = await storage.reserve(req(user, 10 + i))
        assert result.admitted
        assert result.charged == 10 + i, user


async def test_hostile_ids_stay_inside_their_own_keys(redis_url: str) -> None:
    async with RedisStorage.from_url(redis_url, mode="direct") as storage:
        for i, user in enumerate(HOSTILE_IDS):
            await storage.reserve(req(user, 10 + i))
        client = aioredis.Redis.from_url(redis_url)
        keys = [k.decode() for k in await client.keys("tokenfirewall:*")]
        await client.aclose()
    tags = {encode_user_id(u) for u in HOSTILE_IDS}
    assert len(tags) == len(HOSTILE_IDS)
    assert all(len(k) < 200 for k in keys)
    for key in keys:
        tag = key[key.index("{") + 1 : key.index("}")]
        assert tag in tags
        assert key.count("{") == 1
        assert key.count("}") == 1


async def test_a_repeated_reserve_charges_once(storage: Storage) -> None:
    # A client retry after a timeout may run the same reservation again.
    r = req("alice", 300)
    first = await storage.reserve(r)
    again = await storage.reserve(r)
    assert first.admitted
    assert again.admitted
    assert again.charged == 300
    await storage.settle(settled(r, 100))
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.charged, snap.used, snap.open_reservations) == (100, 100, 0)
