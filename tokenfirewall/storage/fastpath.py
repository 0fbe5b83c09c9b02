"""A lean, auto-pipelined Redis connection for the per-request hot path.

redis-py spends far more CPU per command than the round trip itself costs
(pool checkout, a Pipeline object, a task per batch). The pre-check needs none
of that: every command issued in one event-loop tick is packed by hiredis and
written in one ``write``; replies arrive in order on the same connection and
resolve their futures from ``data_received``. One timer per batch bounds the
wait: a batch not answered in time closes the connection, failing everything
in flight with :class:`StorageUnavailableError` (RESP is ordered, so a late
reply could never be matched again anyway). Single-node Redis only; Cluster
and Sentinel go through redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import NoScriptError, ResponseError

from tokenfirewall.errors import ConfigurationError, StorageUnavailableError
from tokenfirewall.storage.scripts import Script

__all__ = ["FastPipeline", "supports_fastpath"]


def supports_fastpath(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "rediss", "unix")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self.waiters.popleft()
            if future.done():
                continue  # the caller gave up; the reply is still consumed in order
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_reply_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = StorageUnavailableError(f"redis connection lost: {exc!r}")
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True


def _reply_error(message: str) -> Exception:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(_OUTAGE_CODES):
        # The server cannot serve budgets right now: the failure policy applies.
        return StorageUnavailableError(f"redis unavailable: {message}")
    return ResponseError(message)


_OUTAGE_CODES = (
    "OOM ",
    "LOADING ",
    "READONLY ",
    "CLUSTERDOWN ",
    "MASTERDOWN ",
    "TRYAGAIN ",
    "NOPERM ",
    "NOAUTH ",
    "WRONGPASS ",
    "MISCONF ",
    "BUSY ",
    "NOREPLICAS ",
)


class FastPipeline:
    """Same interface as :class:`AutoPipeline`, on one lean connection."""

    def __init__(self, url: str, timeout: float) -> None:
        self._options = _connect_options(url)
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []

    async def call(self, *args: Any) -> Any:
        return await self._submit(hiredis.pack_command(args))

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a command without waiting; the future holds its reply."""
        return self._submit(hiredis.pack_command(args))

    async def run_script(self, script: Script, keys: Sequence[str], argv: Sequence[Any]) -> Any:
        try:
            return await self._submit(
                hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *argv))
            )
        except NoScriptError:
            # First use on this server (or after a restart): EVAL caches it.
            return await self._submit(
                hiredis.pack_command(("EVAL", script.source, len(keys), *keys, *argv))
            )

    def _submit(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol = self._protocol
        if (
            not self._queue
            and protocol is not None
            and not protocol.closed
            and not protocol.waiters
        ):
            # Nothing in flight: send now, a lone request waits for no tick.
            self._write(protocol, [(packed, future)])
            return future
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((packed, future))
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        protocol = self._protocol
        if protocol is None or protocol.closed:
            self._connect_then_write(batch)
            return
        self._write(protocol, batch)

    def _write(self, protocol: _Protocol, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        transport = protocol.transport
        if transport is None or protocol.closed:
            _fail(batch, StorageUnavailableError("redis connection closed"))
            return
        protocol.waiters.extend(future for _, future in batch)
        transport.write(b"".join(packed for packed, _ in batch))
        last = batch[-1][1]
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, protocol, last)
        last.add_done_callback(lambda _: timer.cancel())

    def _connect_then_write(self, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

        def written(task: asyncio.Task[_Protocol]) -> None:
            if task.cancelled():
                _fail(batch, StorageUnavailableError("redis connection attempt cancelled"))
                return
            if (error := task.exception()) is not None:
                _fail(batch, StorageUnavailableError(f"redis unreachable: {error!r}"))
                return
            self._write(task.result(), batch)

        self._connecting.add_done_callback(written)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        try:
            async with asyncio.timeout(self._timeout):
                if "path" in options:
                    _, protocol = await loop.create_unix_connection(_Protocol, options["path"])
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, options["host"], options["port"], ssl=options.get("ssl")
                    )
                try:
                    await self._handshake(protocol)
                except BaseException:
                    protocol.close()
                    raise
        except (OSError, TimeoutError, ResponseError, StorageUnavailableError) as exc:
            raise StorageUnavailableError(f"cannot connect to redis: {exc!r}") from exc
        self._protocol = protocol
        return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        commands: list[tuple[Any, ...]] = []
        password = self._options.get("password")
        if password is not None:
            user = self._options.get("username")
            commands.append(("AUTH", user, password) if user else ("AUTH", password))
        if self._options.get("db"):
            commands.append(("SELECT", self._options["db"]))
        loop = asyncio.get_running_loop()
        futures = []
        for command in commands:
            future: asyncio.Future[Any] = loop.create_future()
            protocol.waiters.append(future)
            if protocol.transport is not None:
                protocol.transport.write(hiredis.pack_command(command))
            futures.append(future)
        for future in futures:
            await future

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


def _expire(protocol: _Protocol, last: asyncio.Future[Any]) -> None:
    if not last.done():
        protocol.close()
        protocol.connection_lost(TimeoutError("redis did not answer in time"))


def _fail(batch: list[tuple[bytes, asyncio.Future[Any]]], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)


def _connect_options(url: str) -> dict[str, Any]:
    parsed: dict[str, Any] = dict(parse_url(url))
    scheme = urlsplit(url).scheme
    if scheme == "unix":
        options: dict[str, Any] = {"path": parsed["path"]}
    else:
        options = {"host": parsed.get("host", "localhost"), "port": parsed.get("port", 6379)}
    if scheme == "rediss":
        options["ssl"] = _ssl_context(parsed)
    for name in ("username", "password", "db"):
        if parsed.get(name) is not None:
            options[name] = parsed[name]
    return options


def _ssl_context(parsed: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=parsed.get("ssl_ca_certs"))
    requirement = str(parsed.get("ssl_cert_reqs", "required")).lower()
    if requirement == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif requirement not in ("required", "optional"):
        raise ConfigurationError(f"unsupported ssl_cert_reqs {requirement!r}")
    return context
