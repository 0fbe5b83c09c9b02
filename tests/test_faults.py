"""Redis crashes, freezes and restarts under concurrent load, through the middleware.

Real ``redis-server`` processes (AOF on, ``appendfsync everysec`` unless said
otherwise) are killed with SIGKILL or frozen with SIGSTOP while requests flow
through a Starlette app wrapped by ``TokenFirewall`` with
``RedisStorage(mode="direct")``. Ground truth is what the app answered: every
response carries its usage. Afterwards the counters in Redis are compared with
it, and every request's duration with the timeouts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.servers import RedisServer, RedisServerFactory
from tokenfirewall import RedisStorage, TokenFirewall, UserBudget
from tokenfirewall.config import Policy
from tokenfirewall.errors import StorageUnavailableError
from tokenfirewall.keys import Keys
from tokenfirewall.messages import Settled
from tokenfirewall.storage import ReserveRequest

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
PERIOD = "2026-12"
USERS = [f"user{i}" for i in range(5)]
LIMIT = 10**9  # never refuses: these tests are about outages, not budgets
STORAGE_TIMEOUT = 0.3
# Scheduling noise on a busy CI machine, on top of the configured timeouts.
SLACK = 1.0
CONCURRENCY = 16


async def chat(request: StarletteRequest) -> Response:
    body = await request.json()
    completion = int(body["max_tokens"]) // 2
    usage = {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion}
    return JSONResponse({"object": "chat.completion", "choices": [], "usage": usage})


APP = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@dataclass
class Outcome:
    user: str
    status: int
    started: float
    ended: float
    tokens: int  # usage the app reported (ground truth), 0 unless admitted
    unreserved: bool  # admitted while the budget store was unreachable

    @property
    def duration(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """CONCURRENCY clients sending requests until stopped."""

    client: httpx.AsyncClient
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _one(self, n: int) -> None:
        user = USERS[n % len(USERS)]
        body = {"model": "gpt-4o", "messages": [], "max_tokens": 10 + n % 50}
        started = time.monotonic()
        r = await self.client.post("/v1/chat/completions", json=body, headers={"x-user-id": user})
        ended = time.monotonic()
        admitted = r.status_code == 200
        self.outcomes.append(
            Outcome(
                user=user,
                status=r.status_code,
                started=started,
                ended=ended,
                tokens=r.json()["usage"]["total_tokens"] if admitted else 0,
                # Failing open reports the bare policy: nothing charged yet.
                unreserved=admitted and r.headers["x-tokenfirewall-remaining"] == str(LIMIT),
            )
        )

    async def _client_loop(self, worker: int) -> None:
        n = worker
        while not self.stop.is_set():
            await self._one(n)
            n += CONCURRENCY

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for worker in range(CONCURRENCY):
                group.create_task(self._client_loop(worker))

    def count(self, since: float = 0.0, status: int | None = None) -> int:
        return sum(1 for o in self.outcomes if o.ended >= since and status in (None, o.status))


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within}s")
        await asyncio.sleep(0.01)


def firewall(storage: RedisStorage, *, fail_open: bool) -> TokenFirewall:
    return TokenFirewall(
        APP,
        user_budget=UserBudget(
            extract_user_id=lambda r: r.headers.get("x-user-id"), monthly_token_limit=LIMIT
        ),
        storage=storage,
        clock=lambda: NOW,
        fail_open=fail_open,
    )


def storage_for(url: str) -> RedisStorage:
    return RedisStorage.from_url(url, mode="direct", timeout=STORAGE_TIMEOUT, clock=lambda: NOW)


@dataclass(frozen=True)
class Counters:
    used: int  # reconciled usage, summed over users
    charged: int  # budget counters
    open_reserved: int  # tokens held by reservations still open
    unreserved_applied: int  # settlements applied by id, without a reservation


def read_counters(url: str) -> Counters:
    keys, client = Keys(), redis.Redis.from_url(url)
    used = charged = held = applied = 0
    try:
        for user in USERS:
            used += int(client.hget(keys.period(user, PERIOD), "u") or 0)
            charged += int(client.get(keys.budget(user, PERIOD)) or 0)
            held += sum(int(v.split(b":")[1]) for v in client.hvals(keys.reservations(user)))
            applied += client.scard(keys.applied(user, PERIOD))
    finally:
        client.close()
    return Counters(used, charged, held, applied)


async def outage(
    server: RedisServer,
    *,
    fail_open: bool,
    break_it: Callable[[], None],
    repair: Callable[[], Awaitable[None]],
) -> tuple[Load, RedisStorage, float]:
    """Load, break Redis, keep loading, repair, load until the backlog is flushed."""
    storage = storage_for(server.url)
    transport = httpx.ASGITransport(app=firewall(storage, fail_open=fail_open))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        load = Load(client)
        running = asyncio.create_task(load.run())
        await until(lambda: load.count(status=200) >= 100, 20, "load before the outage")
        broken_at = time.monotonic()
        break_it()
        await until(lambda: load.count(since=broken_at + STORAGE_TIMEOUT) >= 48, 20, "outage")
        await repair()
        repaired_at = time.monotonic()
        await until(lambda: load.count(since=repaired_at, status=200) >= 100, 20, "recovery")
        load.stop.set()
        await running
        # Under load the backlog drains a pipelined chunk at a time behind new
        # settlements (kept in order); with the load gone it empties.
        await until(lambda: storage.backlog == 0, 20, "a flushed backlog")
    await storage.aclose()
    return load, storage, broken_at


def assert_no_request_hung(load: Load) -> None:
    # Worst case: a reserve that times out, then a settlement that does.
    bound = STORAGE_TIMEOUT + SLACK
    slowest = max(o.duration for o in load.outcomes)
    assert slowest < bound, f"a request took {slowest:.2f}s (bound {bound:.2f}s)"


def assert_consistent(counters: Counters) -> None:
    # Each script writes the budget and the reservation together, so even a
    # truncated AOF keeps charged == reconciled usage + open reservations.
    assert counters.charged == counters.used + counters.open_reserved


async def test_sigkill_fail_open_everysec_buffers_and_reconciles(
    redis_factory: RedisServerFactory,
) -> None:
    server = redis_factory(appendonly=True)
    load, storage, killed_at = await outage(
        server, fail_open=True, break_it=server.kill, repair=lambda: asyncio.to_thread(server.start)
    )
    assert {o.status for o in load.outcomes} == {200}
    assert_no_request_hung(load)
    assert (storage.backlog, storage.dropped) == (0, 0)
    counters = read_counters(server.url)
    truth = sum(o.tokens for o in load.outcomes)
    unreserved = [o for o in load.outcomes if o.unreserved]
    assert unreserved, "the outage admitted nothing without a reservation"
    # Every request admitted during the outage was buffered, then applied once.
    assert counters.unreserved_applied == len(unreserved)
    assert_consistent(counters)
    # Never double counted. What may be lost is Redis's own fsync window
    # (everysec: the last one to two seconds of writes before SIGKILL).
    lost = truth - counters.used
    window = sum(o.tokens for o in load.outcomes if killed_at - 2.5 <= o.ended <= killed_at + 1)
    assert 0 <= lost <= window, (lost, window)
    print(f"everysec SIGKILL: {len(load.outcomes)} requests, {len(unreserved)} unreserved, "
          f"{lost} of {truth} tokens lost in the fsync window")  # fmt: skip


async def test_sigkill_fail_open_fsync_always_loses_nothing(
    redis_factory: RedisServerFactory,
) -> None:
    server = redis_factory(appendonly=True, extra_args=["--appendfsync", "always"])
    load, storage, _ = await outage(
        server, fail_open=True, break_it=server.kill, repair=lambda: asyncio.to_thread(server.start)
    )
    assert {o.status for o in load.outcomes} == {200}
    assert_no_request_hung(load)
    assert (storage.backlog, storage.dropped) == (0, 0)
    counters = read_counters(server.url)
    assert counters.used == sum(o.tokens for o in load.outcomes)
    assert counters.unreserved_applied == sum(1 for o in load.outcomes if o.unreserved)
    assert_consistent(counters)


def freeze(server: RedisServer) -> Callable[[], None]:
    pid = server.pid
    assert pid is not None
    return lambda: os.kill(pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> Callable[[], Awaitable[None]]:
    pid = server.pid
    assert pid is not None

    async def resume() -> None:
        os.kill(pid, signal.SIGCONT)

    return resume


async def test_frozen_redis_fail_open_never_hangs_and_loses_nothing(
    redis_factory: RedisServerFactory,
) -> None:
    server = redis_factory(appendonly=True)
    load, storage, _ = await outage(
        server, fail_open=True, break_it=freeze(server), repair=thaw(server)
    )
    assert {o.status for o in load.outcomes} == {200}
    assert_no_request_hung(load)
    assert (storage.backlog, storage.dropped) == (0, 0)
    counters = read_counters(server.url)
    # Nothing was lost (the process only paused) and nothing counted twice.
    # Commands the frozen server ran late may leave reservations open: they
    # are accounted for in charged and released by the worker on expiry.
    truth = sum(o.tokens for o in load.outcomes)
    assert counters.used == truth
    assert_consistent(counters)


async def test_unreserved_settlement_after_a_late_reserve_applies_once(redis_url: str) -> None:
    """A reserve that timed out on the client but ran on the server, then its
    fail-open settlement sent twice (the first send timed out but ran too)."""
    storage = storage_for(redis_url)
    rid = "late"
    await storage.reserve(
        ReserveRequest("user0", PERIOD, 50, Policy(LIMIT, False, 0), rid, 2**50, 0)
    )
    await storage.settle(unreserved("user0", rid, 10))
    await storage.settle(unreserved("user0", rid, 10))
    await storage.aclose()
    assert read_counters(redis_url).used == 10


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_fail_closed_answers_503_in_time_and_recovers(
    how: str, redis_factory: RedisServerFactory
) -> None:
    server = redis_factory(appendonly=True)
    if how == "sigkill":
        break_it: Callable[[], None] = server.kill

        async def repair() -> None:
            await asyncio.to_thread(server.start)
    else:
        break_it, repair = freeze(server), thaw(server)
    load, _storage, broken_at = await outage(
        server, fail_open=False, break_it=break_it, repair=repair
    )
    assert_no_request_hung(load)
    during = [o for o in load.outcomes if o.started > broken_at + STORAGE_TIMEOUT]
    refused = [o for o in load.outcomes if o.status == 503]
    assert refused
    assert {o.status for o in load.outcomes} == {200, 503}
    # A refusal costs at most one storage timeout (plus scheduling noise).
    assert max(o.duration for o in refused) < STORAGE_TIMEOUT + SLACK
    assert any(o.status == 503 for o in during)
    counters = read_counters(server.url)
    assert counters.unreserved_applied == 0  # fail-closed admits nothing unreserved
    assert_consistent(counters)
    if how == "sigstop":
        assert counters.used == sum(o.tokens for o in load.outcomes)


async def test_storage_reconnects_after_restart_without_traffic_in_between(
    redis_factory: RedisServerFactory,
) -> None:
    server = redis_factory(appendonly=True)
    storage = storage_for(server.url)
    assert await storage.ping()
    server.kill()
    assert not await storage.ping()
    with pytest.raises(StorageUnavailableError):
        await storage.snapshot("user0", PERIOD)
    await asyncio.to_thread(server.start)
    await until_async(storage.ping, 5, "a reconnect")
    await storage.aclose()


async def until_async(probe: Callable[[], Awaitable[Any]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within}s")
        await asyncio.sleep(0.01)


def test_password_and_acl_urls_reach_the_storage(redis_factory: RedisServerFactory) -> None:
    server = redis_factory()
    admin = server.client()
    # Only our prefix: the scripts must stay inside the user's keys.
    admin.acl_setuser(
        "app", enabled=True, passwords=["+apppw"], keys=["tokenfirewall:*"], commands=["+@all"]
    )
    admin.config_set("requirepass", "rootpw")
    admin.close()

    async def reachable(url: str) -> bool:
        storage = storage_for(url)
        try:
            return await storage.ping()
        finally:
            await storage.aclose()

    base = f"127.0.0.1:{server.port}/0"
    assert asyncio.run(reachable(f"redis://:rootpw@{base}"))
    assert asyncio.run(reachable(f"redis://app:apppw@{base}"))
    assert not asyncio.run(reachable(f"redis://app:nope@{base}"))
    assert not asyncio.run(reachable(f"redis://{base}"))


def test_rediss_url_builds_a_tls_client() -> None:
    from redis.asyncio.connection import SSLConnection

    storage = RedisStorage.from_url("rediss://user:pw@127.0.0.1:6380/0")
    pool = storage.client.connection_pool
    assert pool.connection_class is SSLConnection
    assert (pool.connection_kwargs["username"], pool.connection_kwargs["password"]) == (
        "user",
        "pw",
    )


@pytest.mark.parametrize("fail_open", [True, False])
async def test_full_redis_follows_the_failure_policy(
    fail_open: bool, redis_factory: RedisServerFactory
) -> None:
    """OOM under ``noeviction`` (the recommended policy) is an outage, not a 500."""
    server = redis_factory(extra_args=["--maxmemory-policy", "noeviction"])
    storage = storage_for(server.url)
    transport = httpx.ASGITransport(app=firewall(storage, fail_open=fail_open))
    control = server.client()
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        load = Load(client)
        await load._one(0)  # loads the scripts while there is room
        control.config_set("maxmemory", "1")
        await asyncio.gather(*(load._one(n) for n in range(1, 9)))
        control.config_set("maxmemory", "0")
        await until_async(lambda: _recovered(load, storage), 10, "recovery")
    await storage.aclose()
    control.close()
    statuses = [o.status for o in load.outcomes]
    assert set(statuses[1:9]) == ({200} if fail_open else {503})
    counters = read_counters(server.url)
    assert counters.used == sum(o.tokens for o in load.outcomes)


async def _recovered(load: Load, storage: RedisStorage) -> bool:
    await load._one(len(load.outcomes))
    return load.outcomes[-1].status == 200 and storage.backlog == 0


async def test_a_rejected_settlement_does_not_block_the_backlog(
    redis_factory: RedisServerFactory,
) -> None:
    """One settlement Redis refuses for good (here WRONGTYPE) is dropped, counted,
    and the buffered ones behind it still arrive."""
    server = redis_factory(appendonly=True)
    control = server.client()
    control.lpush(Keys().budget("poison", PERIOD), "not a counter")
    control.close()
    storage = storage_for(server.url)
    server.kill()
    with pytest.raises(StorageUnavailableError):
        await storage.settle(unreserved("poison", "rid0", 7))
    # Behind a buffered one, settlements queue up without raising.
    await storage.settle(unreserved("user0", "rid1", 7))
    await storage.settle(unreserved("user1", "rid2", 7))
    assert storage.backlog == 3
    await asyncio.to_thread(server.start)
    await storage.settle(unreserved("user2", "rid3", 7))  # flushes the backlog first
    assert (storage.backlog, storage.dropped) == (0, 1)
    await storage.aclose()
    assert read_counters(server.url).used == 21


def unreserved(user: str, rid: str, actual: int) -> Settled:
    return Settled(rid=rid, user=user, period=PERIOD, reserved=0, actual=actual, limit=LIMIT)
