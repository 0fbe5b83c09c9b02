"""The ``tokenfirewall`` admin command against a real Redis, in process and as a process."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.servers import RedisServerFactory, free_port
from tokenfirewall import RedisStorage, TokenFirewall, UserBudget
from tokenfirewall.admin import main
from tokenfirewall.admin_ops import current_period
from tokenfirewall.keys import Keys, encode_user_id
from tokenfirewall.messages import FIELD, BudgetThreshold, PeriodClosed, decode_event, encode

USAGE = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
NOW = datetime.now(UTC)
PERIOD = current_period()


async def chat(request: StarletteRequest) -> Response:
    await request.body()
    return JSONResponse({"object": "chat.completion", "choices": [], "usage": USAGE})


APP = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def post(url: str, user: str, limit: int = 1000, max_tokens: int = 20, when: Any = None) -> int:
    """One request through the middleware on ``url``; returns the status code."""

    async def run() -> int:
        storage = RedisStorage.from_url(url, mode="direct")
        firewall = TokenFirewall(
            APP,
            user_budget=UserBudget(
                extract_user_id=lambda r: r.headers.get("x-user-id"), monthly_token_limit=limit
            ),
            storage=storage,
            clock=(lambda: when) if when else None,
        )
        transport = httpx.ASGITransport(app=firewall)
        async with storage, httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"model": "gpt-4o", "messages": [], "max_tokens": max_tokens}
            r = await c.post("/v1/chat/completions", json=body, headers={"x-user-id": user})
        return r.status_code

    return asyncio.run(run())


def cli(url: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--redis-url", url, "--timeout", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(url: str, *args: str, capsys: pytest.CaptureFixture[str]) -> Any:
    code, out, err = cli(url, "--json", *args, capsys=capsys)
    assert code == 0, err
    return json.loads(out)


def test_set_limit_applies_at_once_and_clear_restores(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert post(redis_url, "alice") == 200  # creates the record at the app's limit (1000)
    change = cli_json(redis_url, "set-limit", "alice", "30", capsys=capsys)
    assert change["period_limit"] == 30
    # Charged 10 so far; a 20-token completion plus the prompt no longer fits.
    assert post(redis_url, "alice") == 429
    status = cli_json(redis_url, "status", "alice", capsys=capsys)
    assert (status["override"], status["monthly_limit"], status["limit"]) == (30, 30, 30)
    assert (status["used"], status["charged"], status["remaining"]) == (10, 10, 20)
    cleared = cli_json(redis_url, "set-limit", "alice", "--clear", capsys=capsys)
    assert (cleared["previous_override"], cleared["period_limit"]) == (30, 1000)
    assert post(redis_url, "alice") == 200


def test_override_applies_to_a_new_record(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(redis_url, "set-limit", "bob", "15", capsys=capsys)
    assert code == 0
    assert "applies when it is created" in out
    assert post(redis_url, "bob", limit=1_000_000) == 429
    assert post(redis_url, "bob", limit=1_000_000, max_tokens=1) == 200


def test_grant_raises_the_effective_limit(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert post(redis_url, "carol", limit=40) == 200
    assert post(redis_url, "carol", limit=40) == 200
    assert post(redis_url, "carol", limit=40) == 429
    granted = cli_json(redis_url, "grant", "carol", "100", capsys=capsys)
    assert granted["granted"] == 100
    assert post(redis_url, "carol", limit=40) == 200
    status = cli_json(redis_url, "status", "carol", capsys=capsys)
    assert (status["limit"], status["granted"], status["used"]) == (140, 100, 30)
    _code, out, _ = cli(redis_url, "status", "carol", capsys=capsys)
    assert "= monthly 40 + bonus 0 + granted 100" in out


def test_grant_needs_a_record_or_a_policy(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(redis_url, "grant", "dave", "50", capsys=capsys)
    assert code == 2
    assert "--limit" in err
    made = cli_json(redis_url, "grant", "dave", "50", "--limit", "20", capsys=capsys)
    assert (made["granted"], made["monthly_limit"]) == (50, 20)
    assert post(redis_url, "dave", limit=1_000_000, max_tokens=60) == 200  # 70 fits


def test_report_orders_users_by_usage(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for user, requests in (("light", 1), ("heavy", 3), ("middle", 2)):
        for _ in range(requests):
            assert post(redis_url, user) == 200
    rows = cli_json(redis_url, "report", capsys=capsys)
    assert [(r["user"], r["charged"]) for r in rows] == [
        ("heavy", 30),
        ("middle", 20),
        ("light", 10),
    ]
    top = cli_json(redis_url, "report", "--top", "2", capsys=capsys)
    assert [r["user"] for r in top] == ["heavy", "middle"]
    _code, out, _ = cli(redis_url, "report", capsys=capsys)
    lines = out.splitlines()
    assert lines[0].startswith("USER")
    assert lines[1].startswith("heavy")
    assert cli_json(redis_url, "report", "--period", "1999-01", capsys=capsys) == []


def test_events_tail(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = redis.Redis.from_url(redis_url)
    events = Keys().events
    for pct in (80, 90):
        event = BudgetThreshold(user="eve", period=PERIOD, percent=pct, used=pct, limit=100)
        client.xadd(events, {FIELD: encode(event)})
    client.xadd(events, {FIELD: b"not json"})
    client.close()
    code, out, err = cli(redis_url, "--json", "events", "tail", "--count", "2", capsys=capsys)
    assert code == 0, err
    entries = [json.loads(line) for line in out.splitlines()]
    assert entries[0]["event"]["percent"] == 90
    assert entries[1]["event"] is None
    assert entries[1]["raw"] == "not json"
    code, out, _ = cli(redis_url, "events", "tail", capsys=capsys)
    assert "budget.threshold" in out
    assert "user=eve" in out
    assert "(undecodable)" in out


def test_close_period_uses_the_worker_rules(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    november = datetime(2026, 11, 20, tzinfo=UTC)
    assert post(redis_url, "frank", limit=100, when=november) == 200
    code, _, err = cli(redis_url, "close-period", PERIOD, capsys=capsys)
    assert code == 2
    assert "has not ended" in err
    result = cli_json(redis_url, "close-period", "2026-11", capsys=capsys)
    assert (result["records"], result["closed"]) == (1, 1)
    again = cli_json(redis_url, "close-period", "2026-11", capsys=capsys)
    assert (again["records"], again["closed"]) == (1, 0)
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(Keys().events)
        record = client.hget(Keys().period("frank", "2026-11"), "x")
    finally:
        client.close()
    closed = [decode_event(fields[FIELD]) for _, fields in entries]
    assert len(closed) == 1
    assert isinstance(closed[0], PeriodClosed)
    assert (closed[0].user, closed[0].used, closed[0].next_bonus) == ("frank", 10, 0)
    assert record == b"1"


HOSTILE_IDS = ["a}b{c", "}:budget:{victim", "\x1b[31mred", "ü" * 200, "-starts-with-dash", ""]


@pytest.mark.parametrize("user", HOSTILE_IDS)
def test_hostile_ids_stay_in_their_own_keys(
    redis_url: str, user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(redis_url, "set-limit", "--", user, "5", capsys=capsys)[0] == 0
    assert cli(redis_url, "grant", "--limit", "9", "--", user, "7", capsys=capsys)[0] == 0
    code, out, _ = cli(redis_url, "status", "--", user, capsys=capsys)
    assert code == 0
    assert "\x1b" not in out  # escaped, never sent to the terminal raw
    status = cli_json(redis_url, "status", "--", user, capsys=capsys)
    assert (status["user"], status["override"], status["limit"]) == (user, 5, 12)
    rows = cli_json(redis_url, "report", capsys=capsys)
    tag = encode_user_id(user)
    # A hashed id cannot be decoded: it shows as its tag until the worker stores it.
    assert [r["user"] for r in rows] == [tag if tag.startswith("~h") else user]
    client = redis.Redis.from_url(redis_url)
    try:
        keys = client.keys("*")
    finally:
        client.close()
    assert keys
    assert all("{" + tag + "}" in key.decode() for key in keys)


BAD_ARGS = [
    [],
    ["status"],
    ["set-limit", "a"],
    ["set-limit", "a", "5", "--clear"],
    ["set-limit", "a", "lots"],
    ["grant", "a", "0"],
    ["grant", "a", "-5"],
    ["grant", "a", "5", "--rollover"],
    ["status", "a", "--period", "2026-13"],
    ["report", "--top", "x"],
    ["--timeout", "0", "status", "a"],
    ["events"],
    ["close-period", "soon"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a) or "nothing")
def test_bad_arguments_exit_2_with_a_message(
    redis_url: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(redis_url, *args, capsys=capsys)
    assert code == 2
    assert "error" in err
    assert "Traceback" not in err
    assert out == ""


@pytest.fixture
def stopped_server(redis_factory: RedisServerFactory) -> Iterator[str]:
    """A server that accepts connections but never answers (SIGSTOP)."""
    server = redis_factory()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    yield server.url
    os.kill(server.pid, signal.SIGCONT)


@pytest.mark.parametrize("where", ["refused", "silent"])
def test_unreachable_redis_exits_2_within_the_timeout(
    where: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "refused":
        url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    else:
        url = request.getfixturevalue("stopped_server").replace("redis://", "redis://:secret@")
    started = time.monotonic()
    code = main(["--redis-url", url, "--timeout", "0.5", "status", "alice"])
    elapsed = time.monotonic() - started
    _, err = capsys.readouterr()
    assert code == 2
    assert elapsed < 1.5
    assert "cannot reach Redis" in err
    assert "Traceback" not in err
    assert "secret" not in err
    assert ":***@" in err


def test_password_and_acl_user_urls(
    redis_factory: RedisServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    server = redis_factory()
    admin = server.client()
    admin.acl_setuser(
        "ops", enabled=True, passwords=["+opspw"], keys=["tokenfirewall:*"], commands=["+@all"]
    )
    admin.config_set("requirepass", "rootpw")
    admin.close()
    base = f"127.0.0.1:{server.port}/0"
    assert post(f"redis://:rootpw@{base}", "gina") == 200
    assert post(f"redis://ops:opspw@{base}", "gina") == 200
    code, out, _ = cli(f"redis://ops:opspw@{base}", "--json", "status", "gina", capsys=capsys)
    assert code == 0
    assert json.loads(out)["used"] == 20
    code, _, err = cli(f"redis://ops:wrong@{base}", "status", "gina", capsys=capsys)
    assert code == 2
    assert "refused the credentials" in err
    assert "wrong" not in err


def _subprocess(*args: str, env_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENFIREWALL_REDIS_URL": env_url}
    return subprocess.run(
        [sys.executable, "-m", "tokenfirewall.admin", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_runs_as_a_process(redis_url: str) -> None:
    assert post(redis_url, "henry") == 200
    done = _subprocess("--json", "status", "henry", env_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["charged"] == 10
    gone = _subprocess("--timeout", "0.3", "report", env_url=f"redis://127.0.0.1:{free_port()}")
    assert gone.returncode == 2
    assert gone.stderr.startswith("tokenfirewall: error: cannot reach Redis")
    assert "Traceback" not in gone.stderr


def test_events_follow_prints_new_events(redis_url: str) -> None:
    console = os.path.join(os.path.dirname(sys.executable), "tokenfirewall")
    proc = subprocess.Popen(
        [console, "--redis-url", redis_url, "--timeout", "0.4", "events", "tail", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = redis.Redis.from_url(redis_url)
        event = BudgetThreshold(user="ivy", period=PERIOD, percent=80, used=80, limit=100)
        # The follower may start after this XADD (then tail prints it) or
        # before (then XREAD does): either way one line must appear.
        client.xadd(Keys().events, {FIELD: encode(event)})
        client.close()
        assert proc.stdout is not None
        # A deadline, not a blind read: a broken follower must fail, not hang.
        readable, _, _ = select.select([proc.stdout], [], [], 15)
        assert readable, "no event printed within 15 s"
        line = proc.stdout.readline()
        assert "budget.threshold" in line
        assert "user=ivy" in line
    finally:
        proc.terminate()
        proc.wait(10)
