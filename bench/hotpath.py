"""Profile the middleware's hot path on Redis (pyinstrument, plus cProfile totals).

    .venv/bin/python bench/hotpath.py [--setup redis-stream] [--concurrency 1]
                                      [--requests 5000] [--html out.html]

``--concurrency 1`` profiles the sequential (latency) path; 64 profiles the
CPU benchmark's shape. Prints pyinstrument's call tree, then the functions
with the most own time according to cProfile (deterministic, so call counts
are exact; its overhead inflates small functions, read shares, not absolutes).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
from collections.abc import Sequence
from pathlib import Path

from common import ASGIApp, Scope, drive, firewall, redis_server, user_scopes
from pyinstrument import Profiler

from tokenfirewall import RedisStorage
from tokenfirewall.storage.base import Storage
from tokenfirewall.storage.memory import MemoryStorage


async def load(app: ASGIApp, scopes: Sequence[Scope], requests: int, concurrency: int) -> None:
    per_task = requests // concurrency

    async def client(offset: int) -> None:
        for i in range(per_task):
            await drive(app, scopes[(offset + i * concurrency) % len(scopes)])

    await asyncio.gather(*(client(c) for c in range(concurrency)))


def make_storage(setup: str, url: str) -> Storage:
    if setup == "memory":
        return MemoryStorage()
    return RedisStorage.from_url(url, mode="direct" if setup == "redis-direct" else "stream")


async def profile(url: str, args: argparse.Namespace) -> None:
    storage = make_storage(args.setup, url)
    app = firewall(storage)
    scopes = user_scopes(1000)
    await load(app, scopes, 1000, args.concurrency)  # warm-up
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    await load(app, scopes, args.requests, args.concurrency)
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    if args.html:
        Path(args.html).write_text(profiler.output_html())  # noqa: ASYNC240
    prof = cProfile.Profile()
    prof.enable()
    await load(app, scopes, args.requests, args.concurrency)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    await storage.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setup", default="redis-stream",
                        choices=["redis-stream", "redis-direct", "memory"])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--html", default="")
    args = parser.parse_args(argv)
    with redis_server() as server:
        asyncio.run(profile(server.url, args))


if __name__ == "__main__":
    main()
