"""Redis Cluster end to end: a real local 3-master cluster, real worker processes.

The middleware runs in-process (httpx ``ASGITransport``) with
``RedisStorage.from_url(url, cluster=True, shards=3)``; usage is applied by
``python -m worker --cluster --shards 3`` child processes. Ground truth comes
from the responses themselves (the fake endpoint returns its usage).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.cluster import RedisCluster as SyncRedisCluster
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.polling import eventually
from tests.support.processes import WorkerProcess
from tests.support.servers import free_port
from tokenfirewall import RedisStorage, Request, TokenFirewall, UserBudget
from tokenfirewall.keys import Keys, encode_user_id
from tokenfirewall.periods import period_of
from tokenfirewall.storage.base import PeriodSnapshot

SHARDS = 3
GROUP = "tokenfirewall-worker"
KEYS = Keys()
STREAMS = KEYS.usage_shards(SHARDS)
NOW = datetime.now(UTC)
PERIOD = period_of(NOW)
DEADLINE = 30.0


# -- the metered app ------------------------------------------------------------


async def completions(request: StarletteRequest) -> Response:
    """Deterministic usage from the body, returned so the test knows the truth."""
    body = await request.json()
    completion = int(body["max_tokens"]) // 2 + len(body["messages"])
    usage = {"prompt_tokens": 7, "completion_tokens": completion, "total_tokens": 7 + completion}
    return JSONResponse({"object": "chat.completion", "choices": [], "usage": usage})


inner = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def by_header(request: Request) -> str | None:
    value: str | None = request.headers.get("x-user-id")
    return value


def firewall(storage: RedisStorage, app: Any = inner, limit: int = 10**9) -> TokenFirewall:
    return TokenFirewall(
        app,
        user_budget=UserBudget(extract_user_id=by_header, monthly_token_limit=limit),
        storage=storage,
        clock=lambda: NOW,
    )


def http_client(app: TokenFirewall) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def body(max_tokens: int) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens}  # fmt: skip


# -- cluster inspection --------------------------------------------------------------


def cluster_client(url: str) -> SyncRedisCluster:
    return SyncRedisCluster.from_url(url)


def pending_of(client: SyncRedisCluster, consumer: str) -> int:
    """Entries delivered to ``consumer`` and not acknowledged, over every shard."""
    total = 0
    for stream in STREAMS:
        try:
            summary = client.xpending(stream, GROUP)
        except redis.ResponseError:  # no group yet
            continue
        for entry in summary["consumers"]:
            if entry["name"] in (consumer, consumer.encode()):
                total += int(entry["pending"])
    return total


def keyslot(node: redis.Redis, key: str) -> int:
    """The slot the server itself computes for ``key``."""
    return int(node.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]


async def snapshots(storage: RedisStorage, users: list[str]) -> dict[str, PeriodSnapshot | None]:
    found = await asyncio.gather(*(storage.snapshot(u, PERIOD) for u in users))
    return dict(zip(users, found, strict=True))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(url: str, consumer: str, *args: str) -> WorkerProcess:
        process = WorkerProcess(url, tmp_path, "--cluster", "--shards", str(SHARDS), *args,
                                consumer=consumer, metrics_port=free_port())  # fmt: skip
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


# -- (a) exact reconciliation, two workers, one SIGKILLed ---------------------------------


async def test_exact_for_50_users_while_one_of_two_workers_is_sigkilled(
    cluster_urls: list[str], workers: Callable[..., WorkerProcess]
) -> None:
    url = cluster_urls[0]
    users = [f"user-{n}" for n in range(48)] + ["odd {user} id", "x" * 200]
    rng = random.Random(5)
    plan = [(rng.choice(users), rng.randint(1, 400)) for _ in range(3000)]
    truth: Counter[str] = Counter()
    inspect = cluster_client(url)
    args = ("--batch-size", "20", "--claim-idle-ms", "500")
    w1, w2 = workers(url, "w1", *args), workers(url, "w2", *args)
    await eventually(lambda: w1.is_ready() and w2.is_ready(), DEADLINE, "workers ready")

    storage = RedisStorage.from_url(url, cluster=True, shards=SHARDS)  # stream mode
    queue = iter(plan)

    async def send(c: httpx.AsyncClient, count: int) -> None:
        async def one_client(share: int) -> None:
            for user, max_tokens in itertools.islice(queue, share):
                r = await c.post("/v1/chat/completions", json=body(max_tokens),
                                 headers={"x-user-id": user})  # fmt: skip
                assert r.status_code == 200, r.text
                truth[user] += r.json()["usage"]["total_tokens"]

        await asyncio.gather(*(one_client(count // 24) for _ in range(24)))

    async with http_client(firewall(storage)) as c:
        await send(c, len(plan) // 3)
        # Freeze w2, then keep the load coming until entries are pending on it
        # (delivered to its blocked read, or the batch in its hands); then kill
        # it: the survivor must XAUTOCLAIM them. A frozen process cannot
        # acknowledge anything, and load sent while it is frozen guarantees
        # deliveries to take over (a blocked reader is served in turn).
        held = 0
        for _ in range(20):
            w2.pause()
            await send(c, 96)
            held = pending_of(inspect, "w2")
            if held:
                break
            w2.resume()
        w2.kill()
        assert held > 0, "w2 never held pending entries"
        await send(c, len(plan))  # the rest of the plan, with w2 dead
    await storage.aclose()  # the last settlements handed over are sent
    assert (storage.backlog, storage.dropped) == (0, 0)
    assert len(truth) == len(users)

    # Every shard carried usage, so every shard must be consumed for exactness.
    added = [int(inspect.xinfo_stream(s)["entries-added"]) for s in STREAMS]
    assert all(n > 0 for n in added), added
    assert sum(added) == len(plan), added

    async with RedisStorage.from_url(url, cluster=True, shards=SHARDS) as reader:

        async def exact() -> bool:
            snaps = await snapshots(reader, users)
            got = {u: s and (s.used, s.charged, s.open_reservations) for u, s in snaps.items()}
            return got == {u: (truth[u], truth[u], 0) for u in users}

        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not await exact():
            if asyncio.get_running_loop().time() > deadline:
                snaps = await snapshots(reader, users)
                wrong = {u: (s and (s.used, s.charged, s.open_reservations), truth[u])
                         for u, s in snaps.items()
                         if s is None or (s.used, s.charged) != (truth[u], truth[u])}  # fmt: skip
                pytest.fail(f"not reconciled: {wrong}\n{w1.output()[-3000:]}")
            await asyncio.sleep(0.05)
    assert pending_of(inspect, "w2") == 0  # taken over by the survivor
    await eventually(lambda: pending_of(inspect, "w1") == 0, DEADLINE, "everything acked")
    assert w1.alive, w1.output()
    inspect.close()


# -- (b) no overspend for one hot user ------------------------------------------------------


async def test_hot_user_never_overspends_under_200_concurrent_requests(
    cluster_urls: list[str],
) -> None:
    url = cluster_urls[0]
    limit = 5000
    # direct mode: settle.lua runs through the cluster pipeline too.
    storage = RedisStorage.from_url(url, cluster=True, shards=SHARDS, mode="direct")
    gate = asyncio.Event()

    async def held(scope: Any, receive: Any, send: Any) -> None:
        # Admitted requests wait until all 200 are reserved or refused, so no
        # settlement frees room early: exactly what fits must be admitted.
        await gate.wait()
        await inner(scope, receive, send)

    async with http_client(firewall(storage, app=held, limit=limit)) as c:
        hot = {"x-user-id": "hot"}
        tasks = [
            asyncio.create_task(c.post("/v1/chat/completions", json=body(100), headers=hot))
            for _ in range(200)
        ]

        async def all_decided() -> bool:
            snap = await storage.snapshot("hot", PERIOD)
            done = sum(t.done() for t in tasks)
            return snap is not None and snap.open_reservations + done >= len(tasks)

        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not await all_decided():
            assert asyncio.get_running_loop().time() < deadline, "requests not decided"
            await asyncio.sleep(0.01)
        gate.set()
        responses = await asyncio.gather(*tasks)
    await storage.aclose()
    assert all(r.status_code in (200, 429) for r in responses)
    admitted = [r for r in responses if r.status_code == 200]
    estimate = limit - max(int(r.headers["x-tokenfirewall-remaining"]) for r in admitted)
    assert estimate > 0
    assert len(admitted) * estimate <= limit
    assert len(admitted) == limit // estimate  # exactly what fits
    # Every admitted request saw its own slot of the budget: no two shared one.
    remaining = sorted(int(r.headers["x-tokenfirewall-remaining"]) for r in admitted)
    assert remaining == sorted(limit - k * estimate for k in range(1, len(admitted) + 1))
    actual = admitted[0].json()["usage"]["total_tokens"]
    async with RedisStorage.from_url(url, cluster=True, shards=SHARDS) as reader:
        snap = await reader.snapshot("hot", PERIOD)
    assert snap is not None
    assert (snap.used, snap.charged, snap.open_reservations) == (
        actual * len(admitted), actual * len(admitted), 0)  # fmt: skip


# -- (c) keys spread over the masters, one user in one slot --------------------------------------


async def test_keys_spread_over_masters_and_each_user_stays_in_one_slot(
    cluster_urls: list[str],
) -> None:
    url = cluster_urls[0]
    users = [f"spread-{n}" for n in range(60)] + ["odd {user} id", "~" + "h" * 300]
    storage = RedisStorage.from_url(url, cluster=True, shards=SHARDS)  # stream mode
    gate = asyncio.Event()

    async def held(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()  # keeps one reservation open per user while we look
        await inner(scope, receive, send)

    nodes = [redis.Redis.from_url(u) for u in cluster_urls]
    try:
        async with http_client(firewall(storage, app=held)) as c:
            tasks = [
                asyncio.create_task(
                    c.post("/v1/chat/completions", json=body(10), headers={"x-user-id": user})
                )
                for user in users
            ]
            await eventually(
                lambda: sum(n.dbsize() for n in nodes) >= 3 * len(users), DEADLINE,
                "budget, period and reservation keys of every user",
            )  # fmt: skip
            keys_by_node = [[k.decode("utf-8", "replace") for k in n.scan_iter(count=1000)]
                            for n in nodes]  # fmt: skip
            gate.set()
            responses = await asyncio.gather(*tasks)
        await storage.aclose()
        assert all(r.status_code == 200 for r in responses)

        # Every master holds user keys.
        assert all(any(":{" in k for k in keys) for keys in keys_by_node), [
            len(keys) for keys in keys_by_node
        ]
        for user in users:
            tag = "{" + encode_user_id(user) + "}"
            where = {i for i, keys in enumerate(keys_by_node) for k in keys if tag in k}
            assert len(where) == 1, (user, where)
            (node,) = where
            mine = [k for k in keys_by_node[node] if tag in k]
            expected = {KEYS.budget(encode_user_id(user), PERIOD),
                        KEYS.period(encode_user_id(user), PERIOD),
                        KEYS.reservations(encode_user_id(user))}  # fmt: skip
            assert expected <= set(mine), (user, mine)
            slots = {keyslot(nodes[node], k) for k in mine}
            assert len(slots) == 1, (user, mine, slots)

        # The usage shards are distinct slots, and each got this run's settlements.
        slots = {keyslot(nodes[0], s) for s in STREAMS}
        assert len(slots) == SHARDS
        inspect = cluster_client(url)
        try:
            assert sum(inspect.xlen(s) for s in STREAMS) == len(users)
            assert all(inspect.xlen(s) > 0 for s in STREAMS)
        finally:
            inspect.close()
    finally:
        for n in nodes:
            n.close()
