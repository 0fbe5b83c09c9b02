"""Shared helpers for the benchmarks: percentiles, a raw ASGI driver, servers, output.

Every benchmark starts its own throwaway ``redis-server`` on a free port of
127.0.0.1 (never 6379) through ``tests.support.servers.RedisServer``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.servers import RedisServer  # noqa: E402
from tokenfirewall import Rollover, TokenFirewall, UserBudget  # noqa: E402
from tokenfirewall.storage.base import Storage  # noqa: E402

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

RESULT_MARK = "BENCH_RESULTS_JSON:"
LIMIT = 10**12  # budgets never run out during a benchmark

REQUEST_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 64,
    }
).encode()

RESPONSE_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 14, "completion_tokens": 4, "total_tokens": 18},
    }
).encode()

_RESPONSE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(RESPONSE_BODY)).encode()),
]


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of unsorted samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------
# The bare app and a minimal ASGI driver
# --------------------------------------------------------------------------


async def bare_app(scope: Scope, receive: Callable[[], Awaitable[Message]],
                   send: Callable[[Message], Awaitable[None]]) -> None:
    """A minimal raw ASGI app answering an OpenAI-style chat completion with usage."""
    message = await receive()
    while message.get("more_body", False):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": _RESPONSE_HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE_BODY, "more_body": False})


def make_scope(user: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(REQUEST_BODY)).encode()),
            (b"x-user-id", user.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class Call:
    """One hand-written ASGI request: the body in one message, responses recorded.

    ``last_byte_ns`` is when the final body chunk reached the "client", so the
    time the client waits can be told apart from the time the call occupies.
    """

    __slots__ = ("last_byte_ns", "sent", "status")

    def __init__(self) -> None:
        self.sent = False
        self.status = 0
        self.last_byte_ns = 0

    async def receive(self) -> Message:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": REQUEST_BODY, "more_body": False}
        await _forever()
        return {"type": "http.disconnect"}  # pragma: no cover

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body", False):
            self.last_byte_ns = time.perf_counter_ns()


async def _forever() -> None:
    await asyncio.Event().wait()


async def drive(app: ASGIApp, scope: Scope) -> Call:
    """Run one request through ``app``; raises if the answer is not a 200."""
    call = Call()
    await app(scope, call.receive, call.send)
    if call.status != 200:
        raise RuntimeError(f"unexpected status {call.status}")
    return call


def firewall(storage: Storage, app: ASGIApp = bare_app) -> ASGIApp:
    """``bare_app`` behind the middleware, budgets that never run out."""
    budget = UserBudget(
        extract_user_id=lambda request: request.headers.get("x-user-id"),
        monthly_token_limit=LIMIT,
        rollover=Rollover(enabled=True, max_carryover=LIMIT // 2),
    )
    return TokenFirewall(app, user_budget=budget, storage=storage)  # type: ignore[arg-type]


def user_scopes(count: int, prefix: str = "user") -> list[Scope]:
    return [make_scope(f"{prefix}-{i}") for i in range(count)]


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


@contextmanager
def redis_server(*extra_args: str) -> Iterator[RedisServer]:
    """A throwaway redis-server on a free loopback port, closed at the end."""
    server = RedisServer(extra_args=extra_args)
    server.start()
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One reported number, with its target when there is one."""

    bench: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None


def check(value: float, limit: float) -> bool:
    return value <= limit


def report(title: str, figures: Sequence[Figure]) -> None:
    """Print the figures for humans, then one JSON line for ``run_all.py``."""
    print(f"\n== {title} ==")
    for fig in figures:
        verdict = "" if fig.ok is None else ("  PASS" if fig.ok else "  FAIL")
        target = f"  (target {fig.target})" if fig.target else ""
        print(f"  {fig.name:<58} {fig.value:>12.3f} {fig.unit}{target}{verdict}")
    print(RESULT_MARK + json.dumps([asdict(f) for f in figures]))


def us(ns: float) -> float:
    return ns / 1000.0


def ms(ns: float) -> float:
    return ns / 1_000_000.0


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on, and how busy it was."""
    import os
    import platform
    import subprocess
    import timeit

    from tests.support.servers import find_redis_server

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    server = subprocess.run([find_redis_server(), "--version"], capture_output=True,
                            text=True, check=False).stdout.split()
    calib = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "redis-server": next((w[2:] for w in server if w.startswith("v=")), "?"),
        "loadavg": Path("/proc/loadavg").read_text().split(" ")[0],
        "calibration sum(range(1000))": f"{calib:.1f} us",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
