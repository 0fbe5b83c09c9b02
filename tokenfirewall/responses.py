"""The middleware's own responses, as raw ASGI (no web framework required)."""

from __future__ import annotations

import math
from datetime import datetime
from functools import lru_cache

import msgspec

from tokenfirewall.config import BudgetInfo
from tokenfirewall.types import ASGIApp, Receive, Scope, Send

__all__ = ["budget_headers", "error_response", "exceeded_response", "iso"]

_json = msgspec.json.Encoder()


@lru_cache(maxsize=256)
def iso(instant: datetime) -> str:
    """ISO 8601 UTC with a ``Z``, the format every ``resetAt`` uses."""
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


def budget_headers(info: BudgetInfo) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-tokenfirewall-limit", str(info.limit).encode()),
        (b"x-tokenfirewall-remaining", str(max(0, info.remaining)).encode()),
        (b"x-tokenfirewall-reset", iso(info.reset_at).encode()),
    ]


def json_response(
    status: int, body: object, headers: list[tuple[bytes, bytes]] | None = None
) -> ASGIApp:
    payload = _json.encode(body)
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(headers or []),
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def exceeded_response(info: BudgetInfo, now: datetime) -> ASGIApp:
    retry_after = max(0, math.ceil((info.reset_at - now).total_seconds()))
    body = {
        "error": "Monthly token budget exceeded",
        "resetAt": iso(info.reset_at),
        "used": info.used,
        "limit": info.limit,
    }
    headers = [(b"retry-after", str(retry_after).encode()), *budget_headers(info)]
    return json_response(429, body, headers)


def error_response(status: int, message: str) -> ASGIApp:
    return json_response(status, {"error": message})
