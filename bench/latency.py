"""Added latency per request of the middleware, sequential, in process.

    .venv/bin/python bench/latency.py [--requests 5000]

Each round drives one request through the bare app and one through the
middleware (alternating, so drift hits both alike) with a hand-written ASGI
call: no HTTP client, no server. Per-request samples of each are kept and the
added latency is the difference of their percentiles. Two clocks:

* call:  until the ASGI call returns (includes the settlement round trip,
  which runs after the last byte, in the middleware's ``finally``);
* ttlb:  until the last response byte is handed to the server (what the
  client waits for).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from common import (
    ASGIApp,
    Figure,
    Scope,
    bare_app,
    drive,
    firewall,
    ms,
    percentile,
    redis_server,
    report,
    user_scopes,
)

from tokenfirewall import RedisStorage
from tokenfirewall.storage.base import Storage
from tokenfirewall.storage.memory import MemoryStorage

TARGET_P50_MS = 0.25
TARGET_P99_MS = 1.0
USERS = 1000


@dataclass
class Samples:
    call: list[int] = field(default_factory=list)
    ttlb: list[int] = field(default_factory=list)


async def timed(app: ASGIApp, scope: Scope, into: Samples) -> None:
    start = time.perf_counter_ns()
    call = await drive(app, scope)
    end = time.perf_counter_ns()
    into.call.append(end - start)
    into.ttlb.append(call.last_byte_ns - start)


async def measure(app: ASGIApp, scopes: Sequence[Scope], rounds: int) -> tuple[Samples, Samples]:
    """Alternate bare and wrapped requests; returns (bare, wrapped) samples."""
    for i in range(min(500, rounds)):  # warm-up: script load, connections, caches
        await drive(app, scopes[i % len(scopes)])
        await drive(bare_app, scopes[i % len(scopes)])
    gc.collect()
    bare, wrapped = Samples(), Samples()
    for i in range(rounds):
        scope = scopes[i % len(scopes)]
        await timed(bare_app, scope, bare)
        await timed(app, scope, wrapped)
    return bare, wrapped


def figures(label: str, bare: Samples, wrapped: Samples, redis: bool) -> list[Figure]:
    out: list[Figure] = []
    for clock in ("call", "ttlb"):
        base, with_mw = getattr(bare, clock), getattr(wrapped, clock)
        for q, target in ((50, TARGET_P50_MS), (99, TARGET_P99_MS)):
            added = ms(percentile(with_mw, q) - percentile(base, q))
            out.append(
                Figure(
                    bench="latency",
                    name=f"{label} added p{q} ({clock})",
                    value=added,
                    unit="ms",
                    target=f"<= {target} ms" if redis else "",
                    ok=(added <= target) if redis else None,
                )
            )
        out.append(both("latency", f"{label} bare p50/p99 ({clock})", base))
        out.append(both("latency", f"{label} with middleware p50/p99 ({clock})", with_mw))
    return out


def both(bench: str, name: str, samples: Sequence[int]) -> Figure:
    p99 = ms(percentile(samples, 99))
    return Figure(bench, name, ms(percentile(samples, 50)), f"ms / {p99:.3f} ms")


@asynccontextmanager
async def storage_for(kind: str, url: str) -> AsyncIterator[Storage]:
    if kind == "memory":
        yield MemoryStorage()
        return
    storage = RedisStorage.from_url(url, mode="direct" if kind == "redis-direct" else "stream")
    try:
        yield storage
    finally:
        await storage.aclose()


async def run(url: str, rounds: int) -> list[Figure]:
    scopes = user_scopes(USERS)
    out: list[Figure] = []
    for kind in ("redis-stream", "redis-direct", "memory"):
        async with storage_for(kind, url) as storage:
            bare, wrapped = await measure(firewall(storage), scopes, rounds)
        out += figures(kind, bare, wrapped, redis=kind.startswith("redis"))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args(argv)
    with redis_server() as server:
        results = asyncio.run(run(server.url, args.requests))
    report(f"latency: sequential, {args.requests} requests per setup", results)


if __name__ == "__main__":
    main()
