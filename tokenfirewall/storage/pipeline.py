"""Automatic pipelining: commands issued in one event-loop tick share a round trip.

Under concurrency this turns N pre-checks into one pipeline (far less CPU per
request); a lone request still goes out on the next tick, so it waits for
nothing. Every batch runs under the storage timeout, so nothing hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.exceptions import (
    ClusterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenfirewall.errors import StorageUnavailableError
from tokenfirewall.storage.scripts import Script

__all__ = ["AutoPipeline", "Command"]

Command = tuple[Any, ...]

# Server states in which Redis answers but cannot serve us for now (full under
# noeviction, loading its AOF, a read-only replica, a cluster reconfiguring,
# an ACL that forbids us): outages, which must follow the failure policy (fail
# open or 503) rather than surface as exceptions (500s) in the app.
_UNAVAILABLE = (
    RedisConnectionError,  # includes LOADING (BusyLoadingError) and auth errors
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    ClusterDownError,  # includes MASTERDOWN
    TryAgainError,
    NoPermissionError,
)
# Replies redis-py does not map to a class of its own.
_UNAVAILABLE_CODES = ("MISCONF ", "BUSY ", "NOREPLICAS ")


def classify(error: Exception) -> Exception:
    """``StorageUnavailableError`` for an outage; any other error as it is (a bug)."""
    if isinstance(error, _UNAVAILABLE) or str(error).startswith(_UNAVAILABLE_CODES):
        unavailable = StorageUnavailableError(f"redis unavailable: {error!r}")
        unavailable.__cause__ = error
        return unavailable
    return error


class _Op:
    __slots__ = ("args", "future", "script")

    def __init__(self, args: Command, script: Script | None, future: asyncio.Future[Any]) -> None:
        self.args = args
        self.script = script
        self.future = future


class AutoPipeline:
    def __init__(self, client: Any, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._queue: list[_Op] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        return await self._submit(args, None)

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a command without waiting; the future holds its reply."""
        return self._submit(args, None)

    async def run_script(self, script: Script, keys: Sequence[str], argv: Sequence[Any]) -> Any:
        return await self._submit(("EVALSHA", script.sha, len(keys), *keys, *argv), script)

    def _submit(self, args: Command, script: Script | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(_Op(args, script, future))
        return future

    def _flush(self) -> None:
        ops, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._run(ops))
        # Keep a reference: the loop holds tasks weakly.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ops: list[_Op]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._execute([op.args for op in ops])
                await self._retry_unloaded(ops, results)
        except ResponseError as exc:
            self._fail(ops, classify(exc))
            return
        except (TimeoutError, RedisError, OSError) as exc:
            self._fail(ops, StorageUnavailableError(f"redis unavailable: {exc!r}"))
            return
        for op, result in zip(ops, results, strict=True):
            if op.future.done():
                continue  # the caller gave up (cancelled)
            if isinstance(result, Exception):
                # Errors inside a pipeline come back as values, per command.
                op.future.set_exception(classify(result))
            else:
                op.future.set_result(result)

    @staticmethod
    def _fail(ops: list[_Op], error: Exception) -> None:
        for op in ops:
            if not op.future.done():
                op.future.set_exception(error)

    async def _execute(self, commands: list[Command]) -> list[Any]:
        if len(commands) == 1:
            try:
                return [await self._client.execute_command(*commands[0])]
            except NoScriptError as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))

    async def _retry_unloaded(self, ops: list[_Op], results: list[Any]) -> None:
        """Load the scripts the server did not know (after a restart, a flush or on
        a new node) once each, then rerun those commands in one pipeline: one
        EVAL per command could take a whole batch past its timeout."""
        missing: list[int] = []
        sources: set[str] = set()
        for i, (op, result) in enumerate(zip(ops, results, strict=True)):
            if isinstance(result, NoScriptError) and op.script is not None:
                missing.append(i)
                sources.add(op.script.source)
        if not missing:
            return
        for source in sources:
            # SCRIPT LOAD goes to every primary on a cluster.
            await self._client.script_load(source)
        retried = await self._execute([ops[i].args for i in missing])
        for i, result in zip(missing, retried, strict=True):
            results[i] = result

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._timeout)
