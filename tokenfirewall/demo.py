"""A self-contained demo: ``python -m tokenfirewall.demo``.

An OpenAI-compatible fake upstream sits behind the middleware on the embedded
default storage (no Redis). Three users send traffic across a simulated month
end; the demo prints each month's budgets and a few refusals.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tokenfirewall import MemoryStorage, Request, Rollover, TokenFirewall, UserBudget
from tokenfirewall.periods import period_of
from tokenfirewall.types import Message, Receive, Scope, Send

LIMIT = 20_000
CARRYOVER = 8_000


async def fake_openai(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers chat completions like OpenAI, with a ``usage`` block (or SSE chunks)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body)
    prompt = sum(len(str(m.get("content", ""))) // 4 + 4 for m in request["messages"])
    completion = random.randint(request.get("max_tokens", 256) // 2, request.get("max_tokens", 256))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if request.get("stream"):
        await _stream(send, usage)
        return
    payload = json.dumps({"object": "chat.completion", "choices": [], "usage": usage}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _stream(send: Send, usage: dict[str, int]) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for word in ("Hello", " there"):
        chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]}
        event = f"data: {json.dumps(chunk)}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})
    tail = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    event = f"data: {json.dumps(tail)}\n\ndata: [DONE]\n\n".encode()
    await send({"type": "http.response.body", "body": event, "more_body": False})


@dataclass
class Tally:
    ok: int = 0
    refused: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)


async def call(app: Any, user: str, max_tokens: int, stream: bool) -> tuple[int, bytes]:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Summarise this report " * 20}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"x-user-id", user.encode()), (b"content-type", b"application/json")],
    }
    sent = False
    out: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # a client that stays connected
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        else:
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["body"]


TRAFFIC = {"alice": (60, 900), "bob": (5, 300), "carol": (25, 600)}  # requests, max_tokens


async def run_month(app: Any, tallies: dict[str, Tally]) -> None:
    for user, (count, max_tokens) in TRAFFIC.items():
        for i in range(count):
            status, body = await call(app, user, max_tokens, stream=i % 3 == 0)
            if status == 429:
                tallies[user].refused += 1
                tallies[user].refusals.append(json.loads(body))
            else:
                tallies[user].ok += 1


async def main() -> None:
    random.seed(7)
    now = [datetime(2026, 11, 20, 9, 0, tzinfo=UTC)]
    storage = MemoryStorage()
    app = TokenFirewall(
        fake_openai,
        provider="openai",
        user_budget=UserBudget(
            extract_user_id=lambda request: _user(request),
            monthly_token_limit=LIMIT,
            rollover=Rollover(enabled=True, max_carryover=CARRYOVER),
        ),
        storage=storage,
        clock=lambda: now[0],
    )
    print(f"Monthly limit {LIMIT:,} tokens per user, rollover capped at {CARRYOVER:,}.\n")
    samples: list[dict[str, Any]] = []
    for start in (datetime(2026, 11, 20, 9, tzinfo=UTC), datetime(2026, 12, 1, 0, tzinfo=UTC)):
        now[0] = start
        tallies = {user: Tally() for user in TRAFFIC}
        await run_month(app, tallies)
        now[0] += timedelta(days=1)
        await print_table(storage, period_of(start), tallies)
        samples.extend(t.refusals[0] for t in tallies.values() if t.refusals)
    print("A few 429 bodies:")
    for body in samples[:3]:
        print("  " + json.dumps(body))


def _user(request: Request) -> str | None:
    value: str | None = request.headers.get("x-user-id")
    return value


async def print_table(storage: MemoryStorage, period: str, tallies: dict[str, Tally]) -> None:
    print(f"Period {period}")
    header = (
        f"{'user':<8}{'used':>9}{'limit':>9}{'bonus':>8}{'remaining':>11}{'ok':>5}{'refusals':>10}"
    )
    print(header)
    print("-" * len(header))
    for user, tally in tallies.items():
        snap = await storage.snapshot(user, period)
        if snap is None:
            continue
        remaining = max(0, snap.limit - snap.charged)
        print(
            f"{user:<8}{snap.used:>9,}{snap.limit:>9,}{snap.bonus:>8,}{remaining:>11,}"
            f"{tally.ok:>5}{tally.refused:>10}"
        )
    print()


if __name__ == "__main__":
    asyncio.run(main())
