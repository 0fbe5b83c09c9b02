"""The ASGI middleware around real Starlette and FastAPI apps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tests.support.polling import eventually
from tokenfirewall import (
    BudgetInfo,
    MemoryStorage,
    RedisStorage,
    Request,
    Rollover,
    Storage,
    TokenFirewall,
    UserBudget,
    record_usage,
)
from tokenfirewall.errors import NotInRequestError

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)


async def chat(request: StarletteRequest) -> Response:
    await request.body()
    return JSONResponse({"object": "chat.completion", "choices": [], "usage": USAGE})


async def broken(request: StarletteRequest) -> Response:
    return JSONResponse({"error": {"message": "upstream down"}}, status_code=502)


async def html(request: StarletteRequest) -> Response:
    record_usage(40)
    record_usage(2)
    return HTMLResponse("<p>answer</p>")


async def echo_len(request: StarletteRequest) -> Response:
    body = await request.body()
    return JSONResponse({"len": len(body), "usage": USAGE})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


inner = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/broken", broken, methods=["POST"]),
        Route("/html", html, methods=["POST", "GET"]),
        Route("/echo", echo_len, methods=["POST"]),
        Route("/health", lambda r: JSONResponse({"ok": True})),
        WebSocketRoute("/ws", ws),
    ]
)


def by_header(request: Request) -> str | None:
    value: str | None = request.headers.get("X-User-Id")
    return value


def firewall(
    storage: Storage | None = None,
    *,
    limit: Any = 100,
    clock: Callable[[], datetime] = lambda: NOW,
    app: Any = inner,
    **options: Any,
) -> TokenFirewall:
    budget_options = {
        k: options.pop(k) for k in ("on_budget_exceeded", "anonymous", "rollover") if k in options
    }
    extract = options.pop("extract_user_id", by_header)
    return TokenFirewall(
        app,
        user_budget=UserBudget(
            extract_user_id=extract, monthly_token_limit=limit, **budget_options
        ),
        storage=storage or MemoryStorage(),
        clock=clock,
        **options,
    )


def client(app: TokenFirewall) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def chat_body(max_tokens: int = 20) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }


async def post(c: httpx.AsyncClient, user: str | None = "alice", **body: Any) -> httpx.Response:
    headers = {"x-user-id": user} if user else {}
    return await c.post("/v1/chat/completions", json=body or chat_body(), headers=headers)


async def test_admitted_responses_carry_budget_headers() -> None:
    async with client(firewall()) as c:
        r = await post(c)
    assert r.status_code == 200
    assert r.json()["usage"] == USAGE
    assert r.headers["x-tokenfirewall-limit"] == "100"
    assert 0 < int(r.headers["x-tokenfirewall-remaining"]) < 100
    assert r.headers["x-tokenfirewall-reset"] == "2027-01-01T00:00:00Z"


async def test_default_refusal_is_exact() -> None:
    storage = MemoryStorage()
    async with client(firewall(storage)) as c:
        statuses = [(await post(c)).status_code for _ in range(8)]
        r = await post(c)
    # Each request reserves its prompt plus max_tokens 20 and really uses 15.
    assert statuses == [200] * 5 + [429] * 3
    assert r.status_code == 429
    assert r.json() == {
        "error": "Monthly token budget exceeded",
        "resetAt": "2027-01-01T00:00:00Z",
        "used": 75,
        "limit": 100,
    }
    assert r.headers["retry-after"] == str(
        int((datetime(2027, 1, 1, tzinfo=UTC) - NOW).total_seconds())
    )
    assert r.headers["x-tokenfirewall-limit"] == "100"
    assert r.headers["x-tokenfirewall-remaining"] == "25"
    assert r.headers["x-tokenfirewall-reset"] == "2027-01-01T00:00:00Z"
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert snap.charged == 75  # five requests at 15 actual tokens; refusals charged nothing


@pytest.mark.parametrize("is_async", [False, True])
async def test_custom_refusal_handler(is_async: bool) -> None:
    seen: list[BudgetInfo] = []

    def handler(request: Request, info: BudgetInfo) -> Response:
        seen.append(info)
        return JSONResponse({"custom": info.remaining, "path": request.path}, status_code=402)

    async def async_handler(request: Request, info: BudgetInfo) -> Response:
        return handler(request, info)

    app = firewall(on_budget_exceeded=async_handler if is_async else handler, limit=10)
    async with client(app) as c:
        r = await post(c)
    assert r.status_code == 402
    assert r.json() == {"custom": 10, "path": "/v1/chat/completions"}
    info = seen[0]
    assert (info.user_id, info.period, info.limit, info.monthly_limit, info.bonus) == (
        "alice",
        "2026-12",
        10,
        10,
        0,
    )
    assert info.requested > 10
    assert info.reset_at == datetime(2027, 1, 1, tzinfo=UTC)


async def test_async_extractor_and_per_user_limits() -> None:
    async def extract(request: Request) -> str | None:
        return request.headers.get("x-user-id")

    async def limits(user: str) -> int:
        return 1000 if user == "vip" else 10

    async with client(firewall(extract_user_id=extract, limit=limits)) as c:
        assert (await post(c, "vip")).status_code == 200
        assert (await post(c, "pleb")).status_code == 429


async def test_extractor_sees_scope_user_and_state() -> None:
    seen: dict[str, Any] = {}

    def extract(request: Request) -> str | None:
        seen.update(user=request.user, method=request.method, state=request.state.tenant)
        return str(request.user)

    fw = firewall(extract_user_id=extract)

    async def with_auth(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "user": "carol", "state": {"tenant": "acme"}}
        await fw(scope, receive, send)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=with_auth), base_url="http://t"
    ) as c:
        r = await c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200
    assert seen == {"user": "carol", "method": "POST", "state": "acme"}


async def test_anonymous_policy() -> None:
    async with client(firewall()) as c:
        allowed = await post(c, None)
    async with client(firewall(anonymous="reject")) as c:
        rejected = await post(c, None)
    assert allowed.status_code == 200
    assert "x-tokenfirewall-limit" not in allowed.headers
    assert rejected.status_code == 401


async def test_path_selection() -> None:
    app = firewall(paths=["/v1/"], exclude_paths=["/v1/models"], limit=0)
    async with client(app) as c:
        assert (await c.get("/health", headers={"x-user-id": "a"})).status_code == 200
        assert (await post(c)).status_code == 429


def test_non_http_scopes_pass_through() -> None:
    with TestClient(firewall(limit=0)) as tc, tc.websocket_connect("/ws") as socket:
        assert socket.receive_text() == "hello"


async def test_oversize_body_is_refused_and_never_reaches_the_app() -> None:
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await inner(scope, receive, send)

    fw = firewall(app=app, max_body_size=1000, limit=10**6)
    async with client(fw) as c:
        declared = await c.post("/echo", content=b"x" * 1001, headers={"x-user-id": "a"})

        async def chunks() -> Any:
            for _ in range(20):
                yield b"y" * 100

        streamed = await c.post("/echo", content=chunks(), headers={"x-user-id": "a"})
        fits = await c.post("/echo", content=b"z" * 1000, headers={"x-user-id": "a"})
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert fits.status_code == 200
    assert fits.json()["len"] == 1000
    assert calls == ["/echo"]


async def test_month_boundary_follows_the_clock() -> None:
    storage = MemoryStorage()
    now = [datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)]
    app = firewall(storage, clock=lambda: now[0], limit=1000)
    async with client(app) as c:
        r = await post(c)
        now[0] += timedelta(milliseconds=1)
        r2 = await post(c)
    assert r.headers["x-tokenfirewall-reset"] == "2027-01-01T00:00:00Z"
    assert r2.headers["x-tokenfirewall-reset"] == "2027-02-01T00:00:00Z"
    dec = await storage.snapshot("alice", "2026-12")
    jan = await storage.snapshot("alice", "2027-01")
    assert dec is not None
    assert jan is not None
    assert (dec.used, jan.used) == (15, 15)


async def test_rollover_through_the_middleware() -> None:
    storage = MemoryStorage()
    now = [datetime(2026, 11, 15, tzinfo=UTC)]
    app = firewall(
        storage, clock=lambda: now[0], limit=100, rollover=Rollover(enabled=True, max_carryover=50)
    )
    async with client(app) as c:
        await post(c)
        now[0] = datetime(2026, 12, 2, tzinfo=UTC)
        r = await post(c)
    assert r.headers["x-tokenfirewall-limit"] == "150"  # 85 unused, capped at 50


async def test_record_usage_wins_for_html_apps() -> None:
    storage = MemoryStorage()
    async with client(firewall(storage, limit=10_000)) as c:
        r = await c.get("/html", headers={"x-user-id": "alice"})
    assert r.status_code == 200
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert snap.used == 42


def test_record_usage_outside_a_request() -> None:
    with pytest.raises(NotInRequestError):
        record_usage(1)


async def test_failed_upstream_settles_zero() -> None:
    storage = MemoryStorage()
    async with client(firewall(storage, limit=1000)) as c:
        r = await c.post("/broken", json=chat_body(), headers={"x-user-id": "alice"})
    assert r.status_code == 502
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.charged, snap.used, snap.open_reservations) == (0, 0, 0)


async def test_app_exception_settles_and_propagates() -> None:
    async def boom(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    storage = MemoryStorage()
    fw = firewall(storage, app=boom, limit=1000)
    async with client(fw) as c:
        with pytest.raises(RuntimeError):
            await post(c)
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.charged, snap.open_reservations) == (0, 0)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"str"',
        b"\xff\xfe",
        b'{"max_tokens": -5}',
        b'{"max_tokens": 1e309}',
        b'{"messages": 7}',
        b"",
    ],
)
async def test_malformed_bodies_never_500(body: bytes) -> None:
    async with client(firewall(limit=10**6)) as c:
        r = await c.post("/echo", content=body, headers={"x-user-id": "alice"})
    assert r.status_code == 200


async def test_fastapi_app_without_lifespan() -> None:
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def completions(payload: dict[str, Any]) -> dict[str, Any]:
        return {"object": "chat.completion", "choices": [], "usage": USAGE}

    storage = MemoryStorage()
    async with client(firewall(storage, app=api, limit=1000)) as c:
        r = await post(c)
    assert r.status_code == 200
    snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert snap.used == 15


async def test_concurrent_requests_on_redis_never_overspend(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, mode="direct")
    # Each request reserves prompt + 20 and really uses 15: hold the inner app
    # until all have reserved so no settlement frees room early.
    gate = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()
        await inner(scope, receive, send)

    fw = firewall(storage, app=slow, limit=1000)
    async with client(fw) as c:
        tasks = [asyncio.create_task(post(c)) for _ in range(200)]
        while True:
            snap = await storage.snapshot("alice", "2026-12")
            if snap is not None and snap.open_reservations + sum(t.done() for t in tasks) >= 200:
                break
            await asyncio.sleep(0.01)
        gate.set()
        responses = await asyncio.gather(*tasks)
    ok = sum(r.status_code == 200 for r in responses)
    estimate = 1000 - int(responses[0].headers["x-tokenfirewall-remaining"])
    assert ok == 1000 // estimate
    assert all(r.status_code in (200, 429) for r in responses)
    await storage.aclose()  # waits for the settlements handed over after each response
    async with RedisStorage.from_url(redis_url, mode="direct") as reader:
        snap = await reader.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.used, snap.open_reservations) == (15 * ok, 0)


async def test_unreachable_redis_fails_closed_fast() -> None:
    storage = RedisStorage.from_url("redis://127.0.0.1:1/0", mode="direct", timeout=0.2)
    async with client(firewall(storage)) as c:
        started = asyncio.get_running_loop().time()
        r = await post(c)
        elapsed = asyncio.get_running_loop().time() - started
    assert r.status_code == 503
    assert r.json() == {"error": "Token budget service unavailable"}
    assert elapsed < 2


async def test_unreachable_redis_fails_open_and_buffers() -> None:
    storage = RedisStorage.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    async with client(firewall(storage, fail_open=True)) as c:
        r = await post(c)
    assert r.status_code == 200
    # The settlement is handed over after the response, and buffered on failure.
    await eventually(lambda: storage.backlog == 1, what="settlement buffered")
    await storage.client.aclose()


async def test_streaming_body_passes_through_in_chunks() -> None:
    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": f"part{i}".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with client(firewall(app=stream, limit=10**6)) as c:
        r = await post(c)
    assert r.text == "part0part1part2"
    assert json.loads(json.dumps(dict(r.headers)))["x-tokenfirewall-limit"] == str(10**6)


async def test_the_storage_clock_drives_the_middleware_when_it_has_none() -> None:
    now = [datetime(2026, 11, 30, 23, 59, tzinfo=UTC)]
    storage = MemoryStorage(clock=lambda: now[0])
    app = TokenFirewall(
        inner,
        user_budget=UserBudget(extract_user_id=by_header, monthly_token_limit=1000),
        storage=storage,
    )
    async with client(app) as c:
        await post(c)
        now[0] = datetime(2026, 12, 1, 0, 1, tzinfo=UTC)
        r = await post(c)
    assert r.headers["x-tokenfirewall-reset"] == "2027-01-01T00:00:00Z"
    nov = await storage.snapshot("alice", "2026-11")
    dec = await storage.snapshot("alice", "2026-12")
    assert nov is not None
    assert dec is not None
    assert (nov.used, dec.used) == (15, 15)
