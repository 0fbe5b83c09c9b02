"""Redis plumbing: clients with timeouts, scripts by SHA, key scans on every master."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError

from tokenfirewall.connection import connect as connect_url
from tokenfirewall.storage.scripts import Script

__all__ = ["connect", "glob_escape", "run_script", "run_scripts", "scan_keys", "tag_of"]

_CONCURRENCY = 64
_TAG = re.compile(rb"\{([^{}]*)\}")


def connect(url: str, *, cluster: bool, timeout: float) -> Any:
    """A client whose every call gives up after ``timeout`` seconds."""
    return connect_url(url, cluster=cluster, timeout=timeout, health_check_interval=30)


async def run_script(client: Any, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """EVALSHA, or EVAL once when the server does not know the script (it caches it)."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.source, len(keys), *keys, *args)


async def run_scripts(
    client: Any, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    """Many calls of one script in one pipeline; errors come back as exceptions."""
    if len(calls) == 1 or isinstance(client, RedisCluster):
        # redis-py refuses scripts in cluster pipelines: concurrent calls
        # instead (the client multiplexes them over its per-node pools).
        return await _concurrently(client, script, calls)
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    results = list(await pipe.execute(raise_on_error=False))
    for i, result in enumerate(results):
        if isinstance(result, NoScriptError):
            keys, args = calls[i]
            try:
                results[i] = await client.eval(script.source, len(keys), *keys, *args)
            except Exception as exc:
                results[i] = exc
    return results


async def _concurrently(
    client: Any, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    results: list[Any] = [None] * len(calls)
    limit = anyio.Semaphore(_CONCURRENCY)

    async def one(i: int, keys: Sequence[str], args: Sequence[Any]) -> None:
        async with limit:
            try:
                results[i] = await run_script(client, script, keys, args)
            except Exception as exc:  # the caller decides per call, as with a pipeline
                results[i] = exc

    async with anyio.create_task_group() as tg:
        for i, (keys, args) in enumerate(calls):
            tg.start_soon(one, i, keys, args)
    return results


def glob_escape(text: str) -> str:
    """Escape SCAN MATCH metacharacters so a prefix matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def scan_keys(client: Any, pattern: str, count: int = 1000) -> AsyncIterator[bytes]:
    """Keys matching ``pattern``; a cluster client scans every master."""
    async for key in client.scan_iter(match=pattern, count=count):
        yield key


def tag_of(key: bytes) -> str | None:
    """The hash tag (encoded user id) of a per-user key."""
    found = _TAG.search(key)
    return found.group(1).decode("utf-8", "surrogateescape") if found else None
