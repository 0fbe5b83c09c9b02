"""One worker process draining N queued settlements; prints events/s.

    python bench/worker_throughput.py [-n 200000] [--users 1000] [--redis-url URL]

Without --redis-url it starts a throwaway redis-server (tests/support/servers.py).
Every settlement has a matching reservation, as in production; the run checks
that every user's counters equal the ground truth afterwards.
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

PERIOD = "2099-01"  # far ahead: never closed by the worker's real clock
CHUNK = 10_000


def populate(client: redis.Redis, n: int, users: int) -> dict[str, int]:
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
            pipe.xadd(keys.usage, {"m": encode(message)})
            truth[user] = truth.get(user, 0) + actual
        pipe.execute()
    return truth


def drained(client: redis.Redis, n: int) -> bool:
    groups = client.xinfo_groups(Keys().usage)
    return bool(groups) and groups[0]["entries-read"] == n and groups[0]["pending"] == 0


def run(url: str, n: int, users: int, batch: int) -> float:
    client = redis.Redis.from_url(url)
    client.flushall()
    truth = populate(client, n, users)
    command = [sys.executable, "-m", "worker", "--redis-url", url, "--consumer", "bench",
               "--batch-size", str(batch), "--sweep-interval", "3600", "--log-level", "warning"]
    started = time.perf_counter()
    worker = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while True:
            try:
                if drained(client, n):
                    break
            except redis.ResponseError:  # the group does not exist yet
                pass
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(15)
    keys = Keys()
    for user, used in truth.items():
        stored = int(client.hget(keys.period(user, PERIOD), "u") or 0)
        if stored != used or int(client.get(keys.budget(user, PERIOD)) or 0) != used:
            raise SystemExit(f"counter mismatch for {user}: {stored} != {used}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="settlements to drain")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    if args.redis_url:
        elapsed = run(args.redis_url, args.n, args.users, args.batch_size)
    else:
        with RedisServer() as server:
            elapsed = run(server.url, args.n, args.users, args.batch_size)
    # Includes the worker's start-up (imports, connecting): a conservative figure.
    print(f"{args.n} settlements in {elapsed:.2f}s: {args.n / elapsed:,.0f} events/s "
          f"(counters verified)")  # fmt: skip
    _ = msgspec  # the worker's codec; imported here so a missing install fails early


if __name__ == "__main__":
    main()
