"""Added CPU time per request of the middleware at 64 concurrent requests.

    .venv/bin/python bench/cpu.py [--requests 10000] [--rounds 5]

64 client tasks share one event loop and drive requests through the bare app,
then through the middleware, in-process (hand-written ASGI calls). The
process CPU time (``time.process_time``: user + system of this process, so
the redis-server's own work is not in it) of each run is divided by its
request count; the added CPU is the median over rounds of (with - without).
The redis-server's CPU per request (``INFO cpu`` delta) is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from common import ASGIApp, Figure, Scope, bare_app, drive, firewall, median, redis_server, report
from common import user_scopes as make_scopes

from tokenfirewall import RedisStorage
from tokenfirewall.storage.base import Storage
from tokenfirewall.storage.memory import MemoryStorage

CONCURRENCY = 64
TARGET_US = 40.0
SETUPS = ("redis-stream", "redis-direct", "memory")


@dataclass(frozen=True)
class Run:
    cpu_s: float
    wall_s: float
    server_cpu_s: float


async def load(app: ASGIApp, scopes: Sequence[Scope], requests: int) -> None:
    per_task = requests // CONCURRENCY

    async def client(offset: int) -> None:
        for i in range(per_task):
            await drive(app, scopes[(offset + i * CONCURRENCY) % len(scopes)])

    await asyncio.gather(*(client(c) for c in range(CONCURRENCY)))


def server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def timed(app: ASGIApp, scopes: Sequence[Scope], requests: int, probe: redis.Redis) -> Run:
    gc.collect()
    server0, wall0, cpu0 = server_cpu(probe), time.perf_counter(), time.process_time()
    await load(app, scopes, requests)
    cpu1, wall1, server1 = time.process_time(), time.perf_counter(), server_cpu(probe)
    return Run(cpu1 - cpu0, wall1 - wall0, server1 - server0)


def make_storage(setup: str, url: str) -> Storage:
    if setup == "memory":
        return MemoryStorage()
    return RedisStorage.from_url(url, mode="direct" if setup == "redis-direct" else "stream")


async def measure(
    setup: str, url: str, probe: redis.Redis, args: argparse.Namespace
) -> list[Figure]:
    storage = make_storage(setup, url)
    app = firewall(storage)
    scopes = make_scopes(2000)
    requests = args.requests - args.requests % CONCURRENCY
    await load(app, scopes, 2 * CONCURRENCY * 10)  # warm-up
    added, server, rps = [], [], []
    for _ in range(args.rounds):
        bare = await timed(bare_app, scopes, requests, probe)
        wrapped = await timed(app, scopes, requests, probe)
        added.append((wrapped.cpu_s - bare.cpu_s) / requests * 1e6)
        server.append((wrapped.server_cpu_s - bare.server_cpu_s) / requests * 1e6)
        rps.append(requests / wrapped.wall_s)
    await storage.aclose()
    return figures(setup, added, server, rps)


def figures(setup: str, added: list[float], server: list[float], rps: list[float]) -> list[Figure]:
    value = median(added)
    redis_setup = setup.startswith("redis")
    out = [
        Figure("cpu", f"{setup} added CPU/request (median of rounds)", value, "us",
               f"<= {TARGET_US:g} us" if redis_setup else "",
               (value <= TARGET_US) if redis_setup else None),
        Figure("cpu", f"{setup} added CPU/request min..max over rounds", min(added),
               f"us .. {max(added):.1f} us"),
        Figure("cpu", f"{setup} throughput with middleware (64 concurrent)", median(rps), "req/s"),
    ]
    if redis_setup:
        out.append(Figure("cpu", f"{setup} redis-server CPU/request", median(server), "us"))
    return out


async def run(url: str, probe: redis.Redis, args: argparse.Namespace) -> list[Figure]:
    out: list[Figure] = []
    for setup in SETUPS:
        out += await measure(setup, url, probe, args)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with redis_server() as server:
        probe = server.client()
        try:
            results = asyncio.run(run(server.url, probe, args))
        finally:
            probe.close()
    title = f"cpu: {CONCURRENCY} concurrent, {args.requests} requests x {args.rounds} rounds"
    report(title, results)


if __name__ == "__main__":
    main()
