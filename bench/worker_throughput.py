"""One worker process draining N queued settlements; prints events/s.

    python bench/worker_throughput.py [-n 200000] [--users 1000] [--batch-size N]
                                      [--redis-url URL]

Without --redis-url it starts a throwaway redis-server (tests/support/servers.py).
Every settlement has a matching reservation, as in production; the run checks
that every user's counters equal the ground truth afterwards.

Timing: the settlements are queued on a side stream (with the consumer group
already created at its start) while the worker starts up (imports,
connections, group check) on the empty usage stream. Once the worker waits in
its blocking read, the side stream is RENAMEd over the usage stream and one
last settlement is added, which wakes the read. The drain rate is measured
from that moment to the last acknowledgement; the start-up time is printed
separately.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.servers import RedisServer  # noqa: E402
from tokenfirewall.keys import Keys  # noqa: E402
from tokenfirewall.messages import Settled, encode  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402

PERIOD = "2099-01"  # far ahead: never closed by the worker's real clock
CHUNK = 10_000


def populate(client: redis.Redis, n: int, users: int, stream: str) -> dict[str, int]:
    """Reservations (as reserve.lua leaves them) plus their settlements on the stream."""
    keys, rng = Keys(), random.Random(1)
    index = 2099 * 12
    truth: dict[str, int] = {}
    for start in range(0, n, CHUNK):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + CHUNK)):
            user, rid = f"user-{rng.randrange(users)}", f"r{i}"
            reserved, actual = 500, rng.randint(0, 600)
            pipe.hset(keys.reservations(user), rid, f"{index}:{reserved}:{2**52}")
            pipe.incrby(keys.budget(user, PERIOD), reserved)
            message = Settled(rid=rid, user=user, period=PERIOD, reserved=reserved,
                              actual=actual, limit=10**12, cap=0)  # fmt: skip
            pipe.xadd(stream, {"m": encode(message)})
            truth[user] = truth.get(user, 0) + actual
        pipe.execute()
    return truth


GROUP = "tokenfirewall-worker"


def drained(client: redis.Redis, n: int) -> bool:
    groups = client.xinfo_groups(Keys().usage)
    return bool(groups) and groups[0]["entries-read"] == n and groups[0]["pending"] == 0


def waiting(client: redis.Redis) -> bool:
    """The worker sits in its blocking read (its connection is blocked on the stream)."""
    return any("b" in c.get("flags", "") for c in client.client_list()
               if c.get("cmd") == "xreadgroup")  # fmt: skip


def run(url: str, n: int, users: int, batch: int) -> tuple[float, float]:
    """(start-up seconds, drain seconds) of one worker process over ``n`` settlements."""
    client = redis.Redis.from_url(url)
    client.flushall()
    keys = Keys()
    side = keys.usage + ":queued"
    truth = populate(client, n - 1, users, side)
    client.xgroup_create(side, GROUP, id="0")
    command = [sys.executable, "-m", "worker", "--redis-url", url, "--consumer", "bench",
               "--batch-size", str(batch), "--sweep-interval", "3600", "--log-level", "warning"]
    launched = time.perf_counter()
    worker = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = launched + 60
        while not waiting(client):
            if time.perf_counter() > deadline or worker.poll() is not None:
                raise SystemExit("the worker did not start")
            time.sleep(0.005)
        started = time.perf_counter()
        client.rename(side, keys.usage)
        wake = Settled(rid="wake", user="user-0", period=PERIOD, reserved=0, actual=1,
                       limit=10**12, cap=0)  # fmt: skip
        client.xadd(keys.usage, {"m": encode(wake)})
        truth["user-0"] = truth.get("user-0", 0) + 1
        while not drained(client, n):
            if time.perf_counter() > started + 600 or worker.poll() is not None:
                raise SystemExit("the worker did not drain the stream")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(15)
    for user, used in truth.items():
        stored = int(client.hget(keys.period(user, PERIOD), "u") or 0)
        if stored != used or int(client.get(keys.budget(user, PERIOD)) or 0) != used:
            raise SystemExit(f"counter mismatch for {user}: {stored} != {used}")
    return started - launched, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="settlements to drain")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=WorkerConfig().batch_size)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    if args.redis_url:
        startup, elapsed = run(args.redis_url, args.n, args.users, args.batch_size)
    else:
        with RedisServer() as server:
            startup, elapsed = run(server.url, args.n, args.users, args.batch_size)
    print(f"{args.n} settlements ({args.users} users, batch {args.batch_size}) drained in "
          f"{elapsed:.2f}s: {args.n / elapsed:,.0f} events/s (counters verified); "
          f"worker start-up {startup:.2f}s, {args.n / (elapsed + startup):,.0f} events/s "
          f"including it")  # fmt: skip
    _ = msgspec  # the worker's codec; imported here so a missing install fails early


if __name__ == "__main__":
    main()
