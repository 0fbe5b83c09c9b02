"""Client URLs: a real Redis Sentinel in front of a real master."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.servers import RedisServerFactory, find_redis_server, free_port
from tests.test_storage_conformance import req, settled
from tokenfirewall.connection import connect
from tokenfirewall.errors import ConfigurationError
from tokenfirewall.storage import RedisStorage


@pytest.fixture
def sentinel_port(redis_factory: RedisServerFactory, tmp_path: Path) -> Iterator[int]:
    master = redis_factory()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor svc 127.0.0.1 {master.port} 1\n"
    )
    process = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_master(port, master.port)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


def _wait_for_master(port: int, master_port: int) -> None:
    deadline = time.monotonic() + 15
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        while time.monotonic() < deadline:
            try:
                addr = client.execute_command("SENTINEL", "get-master-addr-by-name", "svc")
                if addr and int(addr[1]) == master_port:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError("sentinel never reported the master")


async def test_storage_through_sentinel(sentinel_port: int) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/svc/0"
    async with RedisStorage.from_url(url, mode="direct") as storage:
        r = req("alice", 500)
        assert (await storage.reserve(r)).admitted
        await storage.settle(settled(r, 123))
        snap = await storage.snapshot("alice", "2026-12")
    assert snap is not None
    assert (snap.charged, snap.used) == (123, 123)


@pytest.mark.parametrize(
    "url", ["redis+sentinel://127.0.0.1:26379", "redis+sentinel:///svc", "redis+sentinel://h:x/svc"]
)
def test_bad_sentinel_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        connect(url, timeout=0.5)


def test_sentinel_and_cluster_do_not_mix() -> None:
    with pytest.raises(ConfigurationError):
        connect("redis+sentinel://127.0.0.1:26379/svc", cluster=True, timeout=0.5)
