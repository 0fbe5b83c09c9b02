"""Shared fixtures: real, throwaway Redis servers (never mocks).

Set TOKENFIREWALL_TEST_REDIS_URL to run against an existing, disposable
Redis instead of a per-session one; it is FLUSHALLed before every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from tests.support.servers import (
    ExternalRedis,
    RedisCluster,
    RedisServer,
    RedisServerFactory,
)

EXTERNAL_URL_ENV = "TOKENFIREWALL_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | ExternalRedis]:
    """One Redis for the whole session; only ``.url`` is guaranteed."""
    external = os.environ.get(EXTERNAL_URL_ENV)
    if external:
        yield ExternalRedis(url=external)
        return
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer | ExternalRedis) -> str:
    """URL of the session Redis, emptied so each test starts clean."""
    _reset(redis_server.url)
    return redis_server.url


@pytest.fixture
def redis_factory() -> Iterator[RedisServerFactory]:
    """``redis_factory(appendonly=..., extra_args=...)`` starts a private
    server that a test may kill or restart; all are closed at teardown."""
    factory = RedisServerFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master cluster, started only by sessions that ask for it."""
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_urls(redis_cluster: RedisCluster) -> list[str]:
    """URLs of every master, each emptied so the test starts clean."""
    for url in redis_cluster.urls:
        _reset(url)
    return redis_cluster.urls


def _reset(url: str) -> None:
    # SCRIPT FLUSH too: a test must not pass only because an earlier test
    # happened to load a Lua script (that would hide NOSCRIPT handling bugs).
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
