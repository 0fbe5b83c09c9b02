"""A FastAPI app metered by tokenfirewall, settling through the worker.

    pip install 'tokenfirewall' fastapi uvicorn
    uvicorn examples.app:app            # the app
    tokenfirewall-worker --redis-url redis://localhost:6379/0   # the worker
    python examples/subscriber.py       # prints budget.exceeded events
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from tokenfirewall import RedisStorage, Rollover, TokenFirewall, UserBudget, record_usage

REDIS_URL = os.environ.get("TOKENFIREWALL_REDIS_URL", "redis://localhost:6379/0")

api = FastAPI()


@api.post("/v1/chat/completions")
async def chat() -> dict[str, object]:
    # A real app would call its LLM here; we answer with OpenAI-shaped usage.
    return {
        "choices": [{"message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
    }


@api.post("/summarise")
async def summarise() -> dict[str, str]:
    record_usage(250)  # not provider-shaped: report the usage yourself
    return {"summary": "..."}


app = TokenFirewall(
    api,
    provider="openai",
    user_budget=UserBudget(
        extract_user_id=lambda request: request.headers.get("x-user-id"),
        monthly_token_limit=100_000,
        rollover=Rollover(enabled=True, max_carryover=50_000),
    ),
    # mode="stream" (the default): settlements go to the usage stream, and
    # tokenfirewall-worker applies them exactly once.
    storage=RedisStorage.from_url(REDIS_URL),
)
