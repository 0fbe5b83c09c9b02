"""A metered fake OpenAI endpoint, configured by environment, for process tests.

Run with ``uvicorn tests.apps.proxy_app:app``. Usage is deterministic and
returned in the body, so a test can compute the ground truth from responses.

With ``PROXY_GATE=<key>``, a request carrying an ``x-hold`` header (already
admitted: the app runs after the reservation) waits for an item on that Redis
list (``BLPOP``, up to 30 s) before answering, so a test can hold admitted
requests until every concurrent request has been reserved or refused.
"""

from __future__ import annotations

import os
from typing import Any

from redis.asyncio import Redis, RedisCluster
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokenfirewall import RedisStorage, Request, TokenFirewall, UserBudget

REDIS_URL = os.environ["PROXY_REDIS_URL"]
CLUSTER = os.environ.get("PROXY_CLUSTER") == "1"
GATE = os.environ.get("PROXY_GATE")
_gate_client: Any = None


async def _wait_for_gate() -> None:
    global _gate_client
    if _gate_client is None:
        _gate_client = (RedisCluster if CLUSTER else Redis).from_url(REDIS_URL)
    await _gate_client.blpop([GATE], timeout=30)


async def completions(request: StarletteRequest) -> Response:
    body = await request.json()
    if GATE and "x-hold" in request.headers:
        await _wait_for_gate()
    completion = int(body.get("max_tokens", 16)) // 2 + len(body["messages"])
    usage = {"prompt_tokens": 7, "completion_tokens": completion, "total_tokens": 7 + completion}
    return JSONResponse({"object": "chat.completion", "choices": [], "usage": usage})


def _user(request: Request) -> str | None:
    value: str | None = request.headers.get("x-user-id")
    return value


def _limit(user: str) -> int:
    return int(os.environ.get("PROXY_HOT_LIMIT", "5000")) if user == "hot" else 10**9


inner = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
app = TokenFirewall(
    inner,
    user_budget=UserBudget(extract_user_id=_user, monthly_token_limit=_limit),
    storage=RedisStorage.from_url(
        REDIS_URL,
        cluster=CLUSTER,
        shards=int(os.environ.get("PROXY_SHARDS", "1")),
    ),
)
