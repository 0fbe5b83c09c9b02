"""Hostile input through the middleware: never an exception (a 500), never a foreign key.

Request bodies, headers, user ids, upstream status/content-type/bodies and SSE
streams come from hypothesis, with a fixed seed (``derandomize``) so CI is
reproducible. For a longer local hunt:

    TOKENFIREWALL_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz_middleware.py
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfirewall import MemoryStorage, RedisStorage, Storage, TokenFirewall, UserBudget
from tokenfirewall.keys import Keys, encode_user_id
from tokenfirewall.types import Message, Receive, Scope, Send

EXAMPLES = int(os.environ.get("TOKENFIREWALL_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PATHS = ["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings", "/other"]
# Statuses the upstream may answer; 500 is left out so that any 500 seen came
# from the middleware.
UPSTREAM_STATUSES = [200, 201, 400, 404, 429, 502]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
usage_values = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.none(),
    json_values,
)
usage = st.dictionaries(
    st.sampled_from(
        ["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens"]
    ),
    usage_values,
)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["chat", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = {
        "model": draw(st.text(max_size=10) | st.none()),
        "messages": draw(st.lists(st.fixed_dictionaries({"role": st.text(max_size=5),
                                                          "content": json_values}), max_size=3)),
    }  # fmt: skip
    for cap in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "stream"):
        if draw(st.booleans()):
            body[cap] = draw(usage_values)
    return json.dumps(body).encode()


@st.composite
def upstream_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(content type, body): JSON with odd usage, SSE streams, or garbage."""
    kind = draw(st.sampled_from(["json", "sse", "garbage"]))
    if kind == "garbage":
        ctype = draw(st.sampled_from([b"application/json", b"text/event-stream", b"text/plain"]))
        return ctype, draw(st.binary(max_size=400))
    if kind == "json":
        doc = {"object": "chat.completion", "usage": draw(usage), "extra": draw(json_values)}
        return b"application/json", json.dumps(doc).encode()
    events = []
    for _ in range(draw(st.integers(0, 5))):
        data = draw(
            st.one_of(
                st.builds(lambda u: json.dumps({"usage": u}), usage),
                st.builds(lambda u: json.dumps({"type": "message_delta", "usage": u}), usage),
                st.just("[DONE]"),
                st.text(max_size=40),
            )
        )
        sep = draw(st.sampled_from(["\n\n", "\r\n\r\n", "\n", ""]))
        field = draw(st.sampled_from(["data: ", "data:", "event: x\ndata: ", ": c"]))
        events.append(field + data + sep)
    return b"text/event-stream", "".join(events).encode("utf-8", "surrogatepass")


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points)] or [b""]


headers = st.lists(
    st.tuples(
        st.binary(min_size=1, max_size=20).map(bytes.lower),
        st.binary(max_size=60),
    ),
    max_size=6,
)


def upstream(status: int, ctype: bytes, body: bytes, cuts: list[int]) -> Any:
    """An inner app answering arbitrary bytes, in arbitrary chunks."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype)]})  # fmt: skip
        parts = chunked(body, cuts)
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(parts) - 1})  # fmt: skip

    return app


async def drive(app: Any, scope: Scope, body_parts: list[bytes]) -> list[Message]:
    """Run one request through an ASGI app; exceptions propagate (they would be 500s)."""
    inbox: list[Message] = [
        {"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
        for i, part in enumerate(body_parts)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(3600)  # like a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


cases = st.fixed_dictionaries(
    {
        "user": st.text(max_size=200) | st.sampled_from(["}{", "a}:budget:{b", "~b", "~hx"]),
        "from_header": st.booleans(),
        "path": st.sampled_from(PATHS),
        "headers": headers,
        "body": request_bodies(),
        "body_cuts": st.lists(st.integers(0, 400), max_size=3),
        "status": st.sampled_from(UPSTREAM_STATUSES),
        "upstream": upstream_bodies(),
        "cuts": st.lists(st.integers(0, 500), max_size=4),
        "limit": st.integers(0, 10**6),
    }
)


async def run_case(case: dict[str, Any], storage: Storage) -> None:
    ctype, answer = case["upstream"]
    user = case["user"]
    raw_headers = [(k, v) for k, v in case["headers"] if k != b"x-user-id"]
    if case["from_header"]:
        # Header values are bytes: an id arrives as whatever latin-1 text they decode to.
        raw_headers.append((b"x-user-id", user.encode("utf-8", "surrogatepass")))
        user = user.encode("utf-8", "surrogatepass").decode("latin-1")
    firewall = TokenFirewall(
        upstream(case["status"], ctype, answer, case["cuts"]),
        user_budget=UserBudget(
            extract_user_id=(lambda r: r.headers.get("x-user-id"))
            if case["from_header"]
            else (lambda r: case["user"]),
            monthly_token_limit=case["limit"],
        ),
        storage=storage,
        max_body_size=256,
    )
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": case["path"], "raw_path": case["path"].encode(),
        "query_string": b"", "headers": raw_headers, "server": ("t", 80), "client": ("c", 1),
    }  # fmt: skip
    sent = await drive(firewall, scope, chunked(case["body"], case["body_cuts"]))
    start = next(m for m in sent if m["type"] == "http.response.start")
    status = start["status"]
    assert status != 500
    assert status in (case["status"], 413, 429), status
    if status == case["status"] and status not in (413, 429):
        # Admitted: the upstream's bytes pass through unchanged.
        assert b"".join(m.get("body", b"") for m in sent[1:]) == answer
    if isinstance(storage, RedisStorage):
        assert_only_own_keys(storage, user)


def assert_only_own_keys(storage: RedisStorage, user: str) -> None:
    url = storage.client.connection_pool.connection_kwargs
    client = redis.Redis(host=url["host"], port=url["port"])
    try:
        keys = client.keys("*")
    finally:
        client.close()
    tag = ("{" + encode_user_id(user) + "}").encode("utf-8", "surrogateescape")
    shared = {k.encode() for k in (Keys().usage, Keys().events)}
    for key in keys:
        assert key in shared or tag in key, (key, user)


@FUZZ
@given(case=cases)
def test_memory_storage_survives_hostile_input(case: dict[str, Any]) -> None:
    asyncio.run(run_case(case, MemoryStorage()))


@pytest.fixture
def flushing_redis(redis_url: str) -> str:
    return redis_url


@FUZZ
@given(case=cases)
def test_redis_storage_survives_hostile_input(flushing_redis: str, case: dict[str, Any]) -> None:
    async def run() -> None:
        client = redis.Redis.from_url(flushing_redis)
        client.flushdb()  # each example checks its own keys only
        client.close()
        # A generous timeout: this test is about input, not a slow machine.
        storage = RedisStorage.from_url(flushing_redis, mode="direct", timeout=5.0)
        async with storage:
            await run_case(case, storage)

    asyncio.run(run())
