"""Redis storage: one atomic Lua round trip per pre-check, settlements on a stream."""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

import structlog
from redis.exceptions import RedisError, ResponseError

from tokenfirewall.connection import connect
from tokenfirewall.errors import ConfigurationError, StorageUnavailableError
from tokenfirewall.keys import Keys, encode_user_id
from tokenfirewall.messages import FIELD, Refused, Settled, encode
from tokenfirewall.periods import month_index
from tokenfirewall.storage.base import (
    DEFAULT_THRESHOLDS,
    PeriodSnapshot,
    ReserveRequest,
    ReserveResult,
    Storage,
)
from tokenfirewall.storage.fastpath import FastPipeline, supports_fastpath
from tokenfirewall.storage.pipeline import AutoPipeline
from tokenfirewall.storage.scripts import Script, load_script

__all__ = ["RedisStorage"]

log = structlog.get_logger("tokenfirewall.storage")

SettleMode = Literal["stream", "direct"]
FLUSH_CHUNK = 512


class CommandPipeline(Protocol):
    async def call(self, *args: Any) -> Any: ...

    def submit(self, *args: Any) -> asyncio.Future[Any]: ...

    async def run_script(self, script: Script, keys: Sequence[str], argv: Sequence[Any]) -> Any: ...

    async def aclose(self) -> None: ...


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


class RedisStorage(Storage):
    """Budgets in Redis (single node or Cluster), shared by every app process.

    ``mode="stream"`` (default) publishes settlements to the usage stream for
    the worker to reconcile; ``mode="direct"`` applies them at once with the
    same exactly-once script, for deployments without a worker.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "tokenfirewall",
        mode: SettleMode = "stream",
        shards: int = 1,
        timeout: float = 0.5,
        backlog_size: int = 100_000,
        thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
        clock: Callable[[], datetime] | None = None,
        pipeline: CommandPipeline | None = None,
    ) -> None:
        if mode not in ("stream", "direct"):
            raise ConfigurationError("mode must be 'stream' or 'direct'")
        if shards < 1:
            raise ConfigurationError("shards must be at least 1")
        self.client = client
        self.keys = Keys(prefix)
        self.mode: SettleMode = mode
        self.shards = shards
        self.timeout = timeout
        self.clock = clock
        self._thresholds = ",".join(str(int(p)) for p in thresholds)
        # The hot path's commands; redis-py's client serves everything else.
        self._pipeline: CommandPipeline = pipeline or AutoPipeline(client, timeout)
        # Settlements that could not be published yet, oldest first.
        self._backlog: deque[Settled] = deque()
        self._backlog_size = backlog_size
        self.dropped = 0
        self._flush_lock: asyncio.Lock | None = None
        self._flush_task: asyncio.Task[None] | None = None
        # Settlements handed over but not yet confirmed, awaited by aclose().
        self._inflight: set[asyncio.Future[Any]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._reserve = load_script("reserve")
        self._settle = load_script("settle")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        timeout: float = 0.5,
        **options: Any,
    ) -> RedisStorage:
        """Connect lazily to ``url``: see :mod:`tokenfirewall.connection` for the
        URL forms (single node, TLS, unix socket, Sentinel) and ``cluster=True``."""
        client = connect(url, cluster=cluster, timeout=timeout, health_check_interval=30)
        if not cluster and supports_fastpath(url):
            options.setdefault("pipeline", FastPipeline(url, timeout))
        return cls(client, timeout=timeout, **options)

    def _user_keys(self, user_id: str, period: str) -> tuple[str, list[str]]:
        tag = encode_user_id(user_id)
        return tag, self.keys.user_keys(tag, period)

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        tag, keys = self._user_keys(request.user_id, request.period)
        policy = request.policy
        reply = await self._pipeline.run_script(
            self._reserve,
            keys[:4],
            (
                self.keys.prefix,
                tag,
                month_index(request.period),
                request.estimate,
                request.reservation_id,
                request.expires_at_ms,
                policy.monthly_limit,
                int(policy.rollover),
                policy.max_carryover,
            ),
        )
        if self._backlog:
            self._flush_soon()
        admitted, charged, limit, monthly_limit, bonus, first = reply
        return ReserveResult(
            admitted=bool(admitted),
            charged=int(charged),
            limit=int(limit),
            monthly_limit=int(monthly_limit),
            bonus=int(bonus),
            first_refusal=bool(first),
        )

    async def settle(self, settlement: Settled) -> None:
        """Publish (or apply) a settlement; if Redis is down, keep it for later.

        A settlement whose send failed or was cancelled is buffered; if it did
        reach Redis after all, sending it again is harmless: settlements are
        applied once per reservation id.
        """
        if self._backlog:
            self._keep(settlement)
            await self._flush_backlog()
            return
        try:
            await self._send(settlement)
        except BaseException:
            self._keep(settlement)
            raise

    def settle_soon(self, settlement: Settled) -> None:
        """Hand a settlement over without waiting for Redis; never raises.

        In stream mode the XADD goes out on the next write of the pipelined
        connection (the same one as the next pre-check, so order holds); if it
        fails, the settlement joins the backlog. Nothing waits on the request
        path, and a cancelled request cannot lose its settlement.
        """
        if self._backlog:
            self._keep(settlement)
            self._flush_soon()
            return
        if self.mode == "direct":
            self._track(asyncio.get_running_loop().create_task(self._settle_quietly(settlement)))
            return
        future = self._publish_nowait(settlement.user, encode(settlement))
        self._inflight.add(future)
        future.add_done_callback(lambda done: self._published(done, settlement))

    def _published(self, future: asyncio.Future[Any], settlement: Settled) -> None:
        self._inflight.discard(future)
        if future.cancelled() or future.exception() is not None:
            log.warning("settlement_buffered", rid=settlement.rid, user=settlement.user)
            self._keep(settlement)

    async def _settle_quietly(self, settlement: Settled) -> None:
        try:
            await self.settle(settlement)
        except StorageUnavailableError:
            log.warning("settlement_buffered", rid=settlement.rid, user=settlement.user)
        except RedisError as exc:  # kept in the backlog by settle(); say why
            log.error("settlement_failed", rid=settlement.rid, error=repr(exc))

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def apply(self, settlement: Settled) -> list[int]:
        """Apply a settlement with the exactly-once script; returns the script's reply."""
        tag, keys = self._user_keys(settlement.user, settlement.period)
        reply = await self._pipeline.run_script(
            self._settle,
            keys,
            (
                self.keys.prefix,
                tag,
                month_index(settlement.period),
                settlement.rid,
                settlement.reserved,
                settlement.actual,
                settlement.limit,
                int(settlement.rollover),
                settlement.cap,
                self._thresholds,
            ),
        )
        return [int(x) for x in reply]

    async def _send(self, settlement: Settled) -> None:
        if self.mode == "direct":
            await self.apply(settlement)
        else:
            await self._publish(settlement.user, encode(settlement))

    async def _publish(self, user_id: str, payload: bytes) -> None:
        await self._publish_nowait(user_id, payload)

    def _publish_nowait(self, user_id: str, payload: bytes) -> asyncio.Future[Any]:
        shard = zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % self.shards
        return self._pipeline.submit(
            "XADD", self.keys.usage_shard(shard, self.shards), "*", FIELD, payload
        )

    def _keep(self, settlement: Settled) -> None:
        if len(self._backlog) >= self._backlog_size:
            self._drop(settlement, "backlog full")
            return
        self._backlog.append(settlement)

    def _drop(self, settlement: Settled, reason: str) -> None:
        # Counted and logged loudly: usage is lost only here (a buffer
        # overflow during a long outage, or a settlement Redis rejects), and
        # operators must see it.
        self.dropped += 1
        log.error(
            "settlement_dropped",
            rid=settlement.rid,
            user=settlement.user,
            actual=settlement.actual,
            dropped=self.dropped,
            reason=reason,
        )

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def _flush_soon(self) -> None:
        """Redis answered again: drain the backlog without delaying this request."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_backlog())

    async def _flush_backlog(self) -> None:
        """Send buffered settlements in order, a pipelined chunk at a time.

        One at a time could not keep up with new settlements after a long
        outage. Commands of a chunk go out in order on one connection; after
        the first failure the rest stay buffered (any that did land are
        harmless when resent: settlements apply once per reservation id).
        """
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            while self._backlog:
                chunk = list(itertools.islice(self._backlog, FLUSH_CHUNK))
                results = await asyncio.gather(
                    *(self._send(s) for s in chunk), return_exceptions=True
                )
                for settlement, result in zip(chunk, results, strict=True):
                    if isinstance(result, ResponseError):
                        # Redis refused this one (it would every time): drop
                        # it, counted, rather than block everything behind it.
                        self._drop(settlement, repr(result))
                    elif isinstance(result, BaseException):
                        self._retry_later()
                        return
                    self._backlog.popleft()

    def _retry_later(self) -> None:
        """Still unreachable: try again soon even if no request comes to trigger it."""
        if self._retry is None or self._retry.cancelled():
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self.timeout * 2, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self._backlog:
            self._flush_soon()

    async def refused(self, refusal: Refused) -> None:
        if self.mode == "stream":
            await self._publish(refusal.user, encode(refusal))

    async def snapshot(self, user_id: str, period: str) -> PeriodSnapshot | None:
        _, keys = self._user_keys(user_id, period)
        idx = month_index(period)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(keys[0])
        pipe.hmget(keys[1], "l", "b", "g", "u", "f", "x")
        pipe.hvals(keys[3])
        try:
            charged, record, reservations = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:  # redis-py's are not OSErrors
            raise StorageUnavailableError(str(exc)) from exc
        if record[0] is None:
            return None
        limit, bonus, granted, used, final, closed = record
        prefix = f"{idx}:".encode()
        return PeriodSnapshot(
            user_id=user_id,
            period=period,
            charged=_int(charged),
            used=_int(used),
            monthly_limit=_int(limit),
            bonus=_int(bonus),
            granted=_int(granted),
            bonus_final=final == b"1",
            closed=closed == b"1",
            open_reservations=sum(1 for r in reservations if r.startswith(prefix)),
        )

    async def ping(self) -> bool:
        try:
            return bool(await self._pipeline.call("PING"))
        except StorageUnavailableError:
            return False

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout * 2)
        if self._backlog:
            await self._flush_backlog()
        if self._backlog:
            log.error("settlements_unsent_at_close", count=len(self._backlog))
        await self._pipeline.aclose()
        await self.client.aclose()
