"""Redis memory per active user-period.

    .venv/bin/python bench/memory.py [--users 100000] [--batch 5000]

Each of ``--users`` users makes one reserve and one settle through
``RedisStorage(mode="direct")`` (settlements applied at once, no stream), in
concurrent batches. Then every key of those users is measured with
``MEMORY USAGE key SAMPLES 0`` and the sum is divided by the user count;
``INFO memory`` used_memory before/after gives a second, allocator-level view.
User ids look like ``user-000042`` (11 bytes): longer ids cost their length
about three times (once per key name).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import redis
from common import Figure, redis_server, report

from tokenfirewall import RedisStorage
from tokenfirewall.config import Policy
from tokenfirewall.messages import Settled
from tokenfirewall.storage.base import ReserveRequest

TARGET_BYTES = 300
PERIOD = datetime.now(UTC).strftime("%Y-%m")
POLICY = Policy(monthly_limit=100_000, rollover=True, max_carryover=50_000)


def user(i: int) -> str:
    return f"user-{i:06d}"


def reserve_request(i: int, now_ms: int) -> ReserveRequest:
    return ReserveRequest(user_id=user(i), period=PERIOD, estimate=1000, policy=POLICY,
                          reservation_id=f"r{i:08x}", expires_at_ms=now_ms + 900_000,
                          now_ms=now_ms)


def settlement(i: int, now_ms: int) -> Settled:
    return Settled(rid=f"r{i:08x}", user=user(i), period=PERIOD, reserved=1000, actual=700,
                   model="gpt-4o-mini", status=200, at=now_ms, limit=POLICY.monthly_limit,
                   rollover=True, cap=POLICY.max_carryover)


async def populate(url: str, users: int, batch: int, prefix: str) -> None:
    storage = RedisStorage.from_url(url, mode="direct", timeout=30.0, prefix=prefix)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for start in range(0, users, batch):
        ids = range(start, min(users, start + batch))
        results = await asyncio.gather(*(storage.reserve(reserve_request(i, now_ms)) for i in ids))
        if not all(r.admitted for r in results):
            raise RuntimeError("a reservation was refused")
        await asyncio.gather(*(storage.settle(settlement(i, now_ms)) for i in ids))
    await storage.aclose()


def key_sizes(client: redis.Redis, prefix: str) -> Counter[str]:
    """Bytes per key kind (``budget``, ``period``, ...) over all keys under ``prefix``."""
    sizes: Counter[str] = Counter()
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        keys.append(key)
        if len(keys) == 10_000:
            _measure(client, keys, sizes)
            keys = []
    _measure(client, keys, sizes)
    return sizes


def _measure(client: redis.Redis, keys: list[bytes], sizes: Counter[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
    for key, size in zip(keys, pipe.execute(), strict=True):
        kind = key.split(b":")[1].decode()
        sizes[kind] += int(size or 0)
        sizes[f"#{kind}"] += 1


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def figures(users: int, sizes: Counter[str], delta: int) -> list[Figure]:
    kinds = sorted(k for k in sizes if not k.startswith("#"))
    total = sum(sizes[k] for k in kinds)
    per_user = total / users
    out = [
        Figure("memory", "MEMORY USAGE sum / user-period", per_user, "bytes",
               f"<= {TARGET_BYTES} bytes", per_user <= TARGET_BYTES),
        Figure("memory", "INFO used_memory delta / user-period", delta / users, "bytes",
               f"<= {TARGET_BYTES} bytes", delta / users <= TARGET_BYTES),
    ]
    for kind in kinds:
        out.append(Figure("memory", f"  {kind} keys: {sizes['#' + kind]} keys, bytes per user",
                          sizes[kind] / users, "bytes"))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--prefix", default="tokenfirewall", help="RedisStorage key prefix")
    args = parser.parse_args(argv)
    with redis_server() as server:
        client = server.client()
        before = used_memory(client)
        asyncio.run(populate(server.url, args.users, args.batch, args.prefix))
        delta = used_memory(client) - before
        sizes = key_sizes(client, args.prefix)
        client.close()
    report(f"memory: {args.users} users, reserve+settle each, direct, prefix {args.prefix!r}",
           figures(args.users, sizes, delta))


if __name__ == "__main__":
    main()
