"""Peers on the same redis-server: raw redis-benchmark rates, the ``limits`` library.

    .venv/bin/python bench/peers.py [--calls 5000]

1. ``redis-benchmark`` (from PATH) against the throwaway server: INCRBY, an
   EVALSHA of a one-line INCRBY script, and an EVALSHA of our reserve script
   (keys spread over 100k users), at 50 connections without and with
   pipelining (-P 16), and at one connection (its round trip).
2. Per-call latency (sequential) and calls/s (sequential and 64 concurrent)
   of: a bare redis-py asyncio INCRBY (the client's floor), the ``limits``
   library's async moving-window limiter (redis-py implementation), and our
   ``RedisStorage.reserve``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import redis
from common import Figure, percentile, redis_server, report, us
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage as LimitsRedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from tokenfirewall import RedisStorage
from tokenfirewall.config import Policy
from tokenfirewall.storage.base import ReserveRequest
from tokenfirewall.storage.scripts import load_script

USERS = 1000
CONCURRENCY = 64
PERIOD = datetime.now(UTC).strftime("%Y-%m")
POLICY = Policy(monthly_limit=10**12, rollover=True, max_carryover=10**11)
Op = Callable[[int], Awaitable[object]]


# --------------------------------------------------------------------------
# redis-benchmark
# --------------------------------------------------------------------------


def benchmark_commands(client: redis.Redis) -> dict[str, list[str]]:
    incr_sha = client.script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    reserve_sha = client.script_load(load_script("reserve").source)
    tag = "u__rand_int__"
    keys = [f"tokenfirewall:{kind}:{{{tag}}}{suffix}" for kind, suffix in
            (("budget", f":{PERIOD}"), ("period", f":{PERIOD}"), ("user", ""), ("resv", ""))]
    year, month = PERIOD.split("-")
    idx = str(int(year) * 12 + int(month) - 1)
    argv = ["tokenfirewall", tag, idx, "100", "r1", "9999999999999", "1000000000000", "1",
            "100000000000"]
    return {
        "INCRBY": ["INCRBY", "bench:__rand_int__", "5"],
        "EVALSHA incrby": ["EVALSHA", incr_sha, "1", "bench:__rand_int__", "5"],
        "EVALSHA reserve.lua": ["EVALSHA", reserve_sha, "4", *keys, *argv],
    }


def redis_benchmark(
    binary: str, port: int, command: list[str], extra: list[str]
) -> tuple[float, float]:
    """(requests/s, average latency ms) of one redis-benchmark run."""
    args = [binary, "-h", "127.0.0.1", "-p", str(port), "-n", "100000", "-r", "100000",
            "--csv", *extra, *command]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [r for r in csv.reader(io.StringIO(out)) if r and r[0] != "test"]
    return float(rows[-1][1]), float(rows[-1][2])


def raw_figures(port: int, client: redis.Redis) -> list[Figure]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        print("redis-benchmark not found on PATH: raw server rates skipped")
        return []
    out: list[Figure] = []
    for name, command in benchmark_commands(client).items():
        for label, extra in (("-c 50", ["-c", "50"]), ("-c 50 -P 16", ["-c", "50", "-P", "16"]),
                             ("-c 1", ["-c", "1"])):
            rps, latency = redis_benchmark(binary, port, command, extra)
            out.append(Figure("peers", f"redis-benchmark {name} {label}", rps,
                              f"req/s (avg {latency:.3f} ms)"))
    return out


# --------------------------------------------------------------------------
# Client-side peers
# --------------------------------------------------------------------------


async def sequential(op: Op, calls: int) -> tuple[list[int], float]:
    for i in range(200):  # warm-up: connections, script cache
        await op(i)
    samples: list[int] = []
    start = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter_ns()
        await op(i)
        samples.append(time.perf_counter_ns() - t0)
    return samples, calls / (time.perf_counter() - start)


async def concurrent(op: Op, calls: int) -> float:
    per_task = calls // CONCURRENCY

    async def worker(c: int) -> None:
        for i in range(per_task):
            await op(c + i * CONCURRENCY)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(CONCURRENCY)))
    return per_task * CONCURRENCY / (time.perf_counter() - start)


async def peer_figures(name: str, op: Op, calls: int) -> list[Figure]:
    samples, seq_rate = await sequential(op, calls)
    conc_rate = await concurrent(op, calls)
    return [
        Figure("peers", f"{name} p50 / p99 (sequential)", us(percentile(samples, 50)),
               f"us / {us(percentile(samples, 99)):.1f} us"),
        Figure("peers", f"{name} calls/s sequential", seq_rate, "calls/s"),
        Figure("peers", f"{name} calls/s {CONCURRENCY} concurrent", conc_rate, "calls/s"),
    ]


def reserve_op(storage: RedisStorage) -> Op:
    def op(i: int) -> Awaitable[object]:
        now_ms = int(time.time() * 1000)
        return storage.reserve(ReserveRequest(
            user_id=f"user-{i % USERS}", period=PERIOD, estimate=100, policy=POLICY,
            reservation_id=f"r{i}-{now_ms}", expires_at_ms=now_ms + 900_000, now_ms=now_ms))
    return op


async def client_figures(url: str, port: int, calls: int) -> list[Figure]:
    raw = Redis.from_url(url)
    limiter_storage = LimitsRedisStorage(f"async+redis://127.0.0.1:{port}",
                                         implementation="redispy")
    limiter = MovingWindowRateLimiter(limiter_storage)
    item = RateLimitItemPerMinute(1_000_000)
    ours = RedisStorage.from_url(url)
    out = await peer_figures("redis-py INCRBY (client floor)",
                             lambda i: raw.incrby(f"floor:{i % USERS}", 1), calls)
    out += await peer_figures("limits MovingWindowRateLimiter.hit",
                              lambda i: limiter.hit(item, f"user-{i % USERS}"), calls)
    out += await peer_figures("tokenfirewall RedisStorage.reserve", reserve_op(ours), calls)
    await ours.aclose()
    await raw.aclose()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args(argv)
    with redis_server() as server:
        client = server.client()
        results = raw_figures(server.port, client)
        client.flushall()
        client.close()
        results += asyncio.run(client_figures(server.url, server.port, args.calls))
    report("peers: same redis-server, loopback", results)


if __name__ == "__main__":
    main()
