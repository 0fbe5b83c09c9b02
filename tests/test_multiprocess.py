"""Several processes on one Redis: two uvicorn app servers and two worker daemons.

Real HTTP to real ``uvicorn tests.apps.proxy_app:app`` processes; usage applied
by ``python -m worker`` processes sharing one consumer group over two usage
shards. The fake endpoint returns its usage, so the responses are the truth.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.processes import AppProcess, ChildProcess, WorkerProcess
from tests.support.servers import free_port
from tokenfirewall import RedisStorage
from tokenfirewall.periods import period_of

SHARDS = 2
HOT_LIMIT = 5000
GATE = "test:gate"
DEADLINE = 30.0


class Processes:
    """Starts app and worker processes; every one is SIGKILLed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[ChildProcess] = []

    def app(self, url: str) -> AppProcess:
        env = {"PROXY_REDIS_URL": url, "PROXY_SHARDS": str(SHARDS),
               "PROXY_HOT_LIMIT": str(HOT_LIMIT), "PROXY_GATE": GATE}  # fmt: skip
        process = AppProcess("tests.apps.proxy_app:app", free_port(), self.tmp, env)
        self.started.append(process)
        return process

    def worker(self, url: str, consumer: str) -> WorkerProcess:
        process = WorkerProcess(url, self.tmp, "--shards", str(SHARDS), "--batch-size", "50",
                                consumer=consumer, metrics_port=free_port())  # fmt: skip
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def body(max_tokens: int) -> dict[str, object]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens}  # fmt: skip


def applied_by(worker: WorkerProcess) -> float:
    """Settlements this worker applied, from its Prometheus metrics."""
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=2.0).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('tokenfirewall_worker_events_applied_total{kind="settled"}')
    )


async def test_two_apps_two_workers_no_overspend_and_exact_reconciliation(
    redis_url: str, processes: Processes
) -> None:
    apps = [processes.app(redis_url), processes.app(redis_url)]
    workers = [processes.worker(redis_url, "w1"), processes.worker(redis_url, "w2")]
    for app in apps:
        await asyncio.to_thread(app.wait_ready)
    await until(lambda: all(w.is_ready() for w in workers), "the workers to be ready")
    period = period_of(datetime.now(UTC))  # the apps' real clock

    users = [f"user-{n}" for n in range(20)]
    rng = random.Random(3)
    plan = [(user, rng.randint(1, 300)) for user in users for _ in range(40)]
    rng.shuffle(plan)
    truth: Counter[str] = Counter()
    served: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(limits=limits, timeout=DEADLINE) as client,
        RedisStorage.from_url(redis_url) as reader,
    ):
        queue = iter(enumerate(plan))

        async def regular() -> None:
            for n, (user, max_tokens) in queue:
                app = apps[n % 2]
                url, headers = app.base_url + "/v1/chat/completions", {"x-user-id": user}
                r = await client.post(url, json=body(max_tokens), headers=headers)
                assert r.status_code == 200, r.text
                truth[user] += r.json()["usage"]["total_tokens"]
                served[app.port] += 1

        # 200 concurrent requests for "hot", half on each app. Admitted ones are
        # held by the app (x-hold) until all 200 are reserved or refused, so no
        # settlement frees room early: exactly what fits must be admitted.
        hot = [
            asyncio.create_task(client.post(apps[n % 2].base_url + "/v1/chat/completions",
                                            json=body(100),
                                            headers={"x-user-id": "hot", "x-hold": "1"}))
            for n in range(200)
        ]  # fmt: skip
        load = asyncio.gather(*(regular() for _ in range(16)))

        while True:
            snap = await reader.snapshot("hot", period)
            if snap is not None and snap.open_reservations + sum(t.done() for t in hot) >= 200:
                break
            assert not load.done() or load.exception() is None
            await asyncio.sleep(0.02)
        gate = redis.Redis.from_url(redis_url)
        gate.rpush(GATE, *([1] * 200))
        gate.close()
        responses = await asyncio.gather(*hot)
        await load

        assert all(served[app.port] == len(plan) // 2 for app in apps)
        assert all(r.status_code in (200, 429) for r in responses)
        admitted = [r for r in responses if r.status_code == 200]
        remaining = sorted(int(r.headers["x-tokenfirewall-remaining"]) for r in admitted)
        estimate = HOT_LIMIT - remaining[-1]
        assert len(admitted) == HOT_LIMIT // estimate  # exactly what fits, over both apps
        assert remaining == sorted(HOT_LIMIT - k * estimate for k in range(1, len(admitted) + 1))
        actual = admitted[0].json()["usage"]["total_tokens"]
        truth["hot"] = actual * len(admitted)
        assert truth["hot"] <= HOT_LIMIT

        everyone = [*users, "hot"]

        async def state() -> dict[str, tuple[int, int, int] | None]:
            snaps = await asyncio.gather(*(reader.snapshot(u, period) for u in everyone))
            return {
                u: None if s is None else (s.used, s.charged, s.open_reservations)
                for u, s in zip(everyone, snaps, strict=True)
            }

        expected = {u: (truth[u], truth[u], 0) for u in everyone}
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while (got := await state()) != expected:
            if asyncio.get_running_loop().time() > deadline:
                wrong = {u: (got[u], expected[u]) for u in everyone if got[u] != expected[u]}
                pytest.fail(f"not reconciled: {wrong}")
            await asyncio.sleep(0.05)

    hot_state = got["hot"]
    assert hot_state is not None
    assert hot_state[0] <= HOT_LIMIT  # reconciled usage of "hot": no overspend
    # The group split the work: between them the two workers applied every
    # settlement exactly once (which one took how many is the group's choice).
    split = [applied_by(w) for w in workers]
    assert sum(split) == len(plan) + len(admitted), split
    assert all(p.alive for p in [*apps, *workers])
