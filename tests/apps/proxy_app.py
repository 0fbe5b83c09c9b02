"""A metered fake OpenAI endpoint, configured by environment, for process tests.

Run with ``uvicorn tests.apps.proxy_app:app``. Usage is deterministic and
returned in the body, so a test can compute the ground truth from responses.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokenfirewall import RedisStorage, Request, TokenFirewall, UserBudget


async def completions(request: StarletteRequest) -> Response:
    body = await request.json()
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
        os.environ["PROXY_REDIS_URL"],
        cluster=os.environ.get("PROXY_CLUSTER") == "1",
        shards=int(os.environ.get("PROXY_SHARDS", "1")),
    ),
)
