"""Reconciliation lag: from a settlement's publish to its counter being updated.

    python bench/lag.py [--rate 5000] [--seconds 10] [--probe-every 10]

Starts a throwaway redis-server (bench/common.py) and one worker process
(``python -m worker``), then publishes settlements at a steady ``--rate`` for
``--seconds`` through ``RedisStorage`` in stream mode (the app's path): each
one is preceded by a real reservation (``reserve``), as in production.

Method. Every ``--probe-every``-th settlement goes to a probe user of its own
(a fresh user id), so its period record's ``u`` field changes exactly when the
worker's script applies that settlement. The publish instant is taken just
before ``settle()`` is called (so the XADD round trip counts as lag); a poller
reads the ``u`` field of every outstanding probe in one pipelined round trip
every 0.5 ms and records the first instant it shows the settled amount. Lag =
that instant - publish instant, both on this process's monotonic clock (no
clock skew between processes). The figure is an upper bound: it includes up
to one poll period plus one poll round trip (about 0.6 ms here); the other
settlements (spread over 1,000 ordinary users) load the worker like real
traffic. Printed: p50 / p99 / max over all probes, and whether the worker kept
up (every counter exact at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import redis
import redis.asyncio as aioredis
from common import ROOT, Figure, percentile, redis_server, report

from tokenfirewall.config import Policy
from tokenfirewall.keys import Keys
from tokenfirewall.messages import Settled
from tokenfirewall.storage.base import ReserveRequest
from tokenfirewall.storage.redis import RedisStorage

PERIOD = "2099-01"  # never closed by the worker's real clock
EXTRA = os.environ.get("LAG_WORKER_ARGS", "").split()
LIMIT = 10**12
POLL_S = 0.0005


class Probes:
    def __init__(self) -> None:
        self.outstanding: dict[str, tuple[int, float]] = {}  # period key -> (actual, t0)
        self.lags: list[float] = []

    async def poll(self, client: aioredis.Redis, done: asyncio.Event) -> None:
        while not (done.is_set() and not self.outstanding):
            if self.outstanding:
                keys = list(self.outstanding)
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(key, "u")
                values = await pipe.execute()
                now = time.perf_counter()
                for key, value in zip(keys, values, strict=True):
                    actual, t0 = self.outstanding[key]
                    if value is not None and int(value) >= actual:
                        del self.outstanding[key]
                        self.lags.append(now - t0)
            await asyncio.sleep(POLL_S)


async def publish(url: str, rate: int, seconds: float, probe_every: int, probes: Probes) -> int:
    pol = Policy(monthly_limit=LIMIT, rollover=False, max_carryover=0)
    keys = Keys()
    total = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    async with RedisStorage.from_url(url) as storage:

        async def one(i: int) -> None:
            probe = i % probe_every == 0
            user = f"probe-{i}" if probe else f"user-{i % 1000}"
            rid, reserved, actual = f"r{i}", 500, 1 + i % 400
            now_ms = int(time.time() * 1000)
            result = await storage.reserve(ReserveRequest(user, PERIOD, reserved, pol, rid,
                                                          now_ms + 3_600_000, now_ms))  # fmt: skip
            if not result.admitted:
                raise RuntimeError("reservation refused")
            message = Settled(rid=rid, user=user, period=PERIOD, reserved=reserved,
                              actual=actual, limit=LIMIT, cap=0)  # fmt: skip
            t0 = time.perf_counter()
            if probe:
                probes.outstanding[keys.period(user, PERIOD)] = (actual, t0)
            await storage.settle(message)

        start = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            for i in range(sent, due):
                task = asyncio.create_task(one(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(0.001)
        while tasks:
            await asyncio.gather(*list(tasks))
        elapsed = time.perf_counter() - start
    print(f"published {total} settlements in {elapsed:.2f}s ({total / elapsed:,.0f}/s)")
    return total


def worker_waiting(client: redis.Redis) -> bool:
    return any("b" in c.get("flags", "") for c in client.client_list()
               if c.get("cmd") == "xreadgroup")  # fmt: skip


def start_worker(url: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "worker", "--redis-url", url, "--consumer", "lag", *EXTRA,
               "--sweep-interval", "3600", "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def run(
    url: str, worker: subprocess.Popen[bytes], rate: int, seconds: float, probe_every: int
) -> list[float]:
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 30
        while not worker_waiting(client):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the worker did not start")
            await asyncio.sleep(0.01)
        probes = Probes()
        done = asyncio.Event()
        async with aioredis.Redis.from_url(url) as poller:
            polling = asyncio.create_task(probes.poll(poller, done))
            total = await publish(url, rate, seconds, probe_every, probes)
            done.set()
            await asyncio.wait_for(polling, 60)
        groups = client.xinfo_groups(Keys().usage)
        if groups[0]["entries-read"] != total:
            raise SystemExit(f"worker read {groups[0]['entries-read']} of {total}")
    finally:
        worker.terminate()
        worker.wait(15)
    return probes.lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000, help="settlements per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--probe-every", type=int, default=10)
    args = parser.parse_args()
    with redis_server() as server:
        worker = start_worker(server.url)
        lags = asyncio.run(run(server.url, worker, args.rate, args.seconds, args.probe_every))
    ms = [lag * 1000 for lag in lags]
    p99 = percentile(ms, 99)
    report(f"reconciliation lag at {args.rate}/s, {len(ms)} probes", [
        Figure("lag", "publish -> counter updated, p50", percentile(ms, 50), "ms"),
        Figure("lag", "publish -> counter updated, p99", p99, "ms", "<= 10 ms", p99 <= 10),
        Figure("lag", "publish -> counter updated, max", max(ms), "ms"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
