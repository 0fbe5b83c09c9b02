"""One usage stream (shard) read through the consumer group: read, claim, ack, dead-letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from tokenfirewall.errors import StorageUnavailableError
from tokenfirewall.keys import Keys
from tokenfirewall.messages import FIELD
from tokenfirewall.storage.fastpath import FastPipeline
from worker.codec import Entry, Invalid, check, decode_batch
from worker.config import WorkerConfig
from worker.metrics import Metrics
from worker.publisher import Publisher
from worker.reconcile import Plan, Reconciler, Record

__all__ = ["PipelinedReader", "ShardConsumer", "id_tuple"]

log = structlog.get_logger("tokenfirewall.worker")


def id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


class ShardConsumer:
    def __init__(
        self, client: Any, blocking: Any, stream: str, keys: Keys, config: WorkerConfig
    ) -> None:
        self.stream = stream
        self._client = client
        self._blocking = blocking  # its socket timeout outlasts BLOCK
        self._keys = keys
        self._config = config
        self._claim_cursor = "0-0"

    async def ensure_group(self) -> None:
        """Create the group at the stream's start: entries queued before any worker count."""
        try:
            await self._client.xgroup_create(self.stream, self._config.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, block: bool) -> list[Entry]:
        """New entries for this consumer; waits up to ``block_ms`` when ``block``."""
        reply = await self._blocking.xreadgroup(
            self._config.group,
            self._config.consumer,
            {self.stream: ">"},
            count=self._config.batch_size,
            block=self._config.block_ms if block else None,
        )
        return self._entries(reply, deliveries=1)

    async def own_pending(self) -> list[Entry]:
        """Entries delivered to this consumer name before a restart, never acked.

        XCLAIM (not a re-read) so their delivery count grows: an entry that
        kills the worker every time is dead-lettered after ``max_deliveries``.
        """
        pending = await self._client.xpending_range(
            self.stream, self._config.group, min="-", max="+",
            count=self._config.batch_size, consumername=self._config.consumer,
        )  # fmt: skip
        if not pending:
            return []
        counts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        claimed = await self._client.xclaim(
            self.stream, self._config.group, self._config.consumer, 0, list(counts)
        )
        return self._with_counts(claimed, counts, ids=list(counts))

    async def claim(self) -> list[Entry]:
        """Entries left pending by consumers idle for ``claim_idle_ms`` (dead ones)."""
        reply = await self._client.xautoclaim(
            self.stream, self._config.group, self._config.consumer,
            self._config.claim_idle_ms, start_id=self._claim_cursor,
            count=self._config.batch_size,
        )  # fmt: skip
        cursor, claimed = reply[0], reply[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        live = [(i, f) for i, f in claimed if i is not None]
        if not live:
            return []
        first, last = live[0][0], live[-1][0]
        pending = await self._client.xpending_range(
            self.stream, self._config.group, min=first, max=last,
            count=len(live), consumername=self._config.consumer,
        )  # fmt: skip
        counts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        return self._with_counts(live, counts)

    def _with_counts(
        self,
        claimed: Sequence[tuple[bytes | None, dict[bytes, bytes] | None]],
        counts: dict[bytes, int],
        ids: Sequence[bytes] = (),
    ) -> list[Entry]:
        entries = [
            Entry(self.stream, entry_id, fields, counts.get(entry_id, 1) + (1 if ids else 0))
            for entry_id, fields in claimed
            if entry_id is not None
        ]
        # Pending entries trimmed away meanwhile come back without data: ack them.
        seen = {e.id for e in entries}
        entries += [Entry(self.stream, i, None) for i in ids if i not in seen]
        return entries

    def _entries(self, reply: Any, deliveries: int) -> list[Entry]:
        entries: list[Entry] = []
        for _stream, items in reply or ():
            for entry_id, fields in items:
                entries.append(Entry(self.stream, entry_id, fields or None, deliveries))
        return entries

    async def finish(self, ids: Sequence[bytes], dead: Sequence[Invalid]) -> None:
        """Dead-letter what must go, then acknowledge the whole batch, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        for item in dead:
            fields = {
                FIELD: item.entry.payload or b"",
                b"reason": item.reason.encode("utf-8", "replace")[:1000],
                b"stream": self.stream,
                b"id": item.entry.id,
                b"deliveries": item.entry.deliveries,
                b"consumer": self._config.consumer,
                b"at": now_ms,
            }
            pipe.xadd(self._keys.dead_letters, fields, maxlen=self._config.dead_maxlen,
                      approximate=True)  # fmt: skip
        if ids:
            pipe.xack(self.stream, self._config.group, *ids)
        await pipe.execute()


class PipelinedReader:
    """The single-node hot loop: one lean connection, nothing waited for twice.

    Per batch, one write carries the XACK of the batch before, the read of the
    next batch and the script of this one, in that order (Redis runs them in
    order on one connection). The next batch is decoded while the script
    runs, so Python and Redis work side by side. The XACK goes out only after
    the script's reply, as before: an entry is never acknowledged before it is
    applied, and applying stays one atomic script per batch.
    """

    def __init__(
        self,
        url: str,
        keys: Keys,
        config: WorkerConfig,
        reconciler: Reconciler,
        publisher: Publisher,
        metrics: Metrics,
    ) -> None:
        self._url = url
        self._keys = keys
        self._config = config
        self._reconciler = reconciler
        self._publisher = publisher
        self._metrics = metrics
        self._script = reconciler.script

    async def run(
        self, consumer: ShardConsumer, stopping: Callable[[], bool], caught_up: Callable[[], None]
    ) -> None:
        """Read, apply and ack until ``stopping()``; the batch in hand is always finished."""
        cfg = self._config
        conn = FastPipeline(self._url, cfg.redis_timeout + cfg.block_ms / 1000)
        loop = _Loop(conn, consumer.stream, self, stopping, caught_up)
        try:
            await loop.run()
        except StorageUnavailableError as exc:
            raise RedisConnectionError(str(exc)) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await conn.aclose()


@dataclass(slots=True)
class _Batch:
    ids: list[bytes]
    records: Sequence[Record]
    plan: Plan
    # Entry by record position (slow path only; the fast path rebuilds them).
    entries: list[Entry] | None
    payloads: list[bytes] | None
    dead: list[Invalid]


class _Loop:
    def __init__(
        self,
        conn: FastPipeline,
        stream: str,
        reader: PipelinedReader,
        stopping: Callable[[], bool],
        caught_up: Callable[[], None],
    ) -> None:
        cfg = reader._config
        self._conn = conn
        self._stream = stream
        self._r = reader
        self._stopping = stopping
        self._caught_up = caught_up
        read = ("XREADGROUP", "GROUP", cfg.group, cfg.consumer, "COUNT", cfg.batch_size)
        self._read = (*read, "STREAMS", stream, ">")
        self._block = (*read, "BLOCK", cfg.block_ms, "STREAMS", stream, ">")
        self._acks: list[asyncio.Future[Any]] = []
        self._lag = reader._metrics.lag_seconds.labels(stream=stream)

    async def run(self) -> None:
        cfg = self._r._config
        batch: _Batch | None = None
        try:
            while True:
                if batch is None:
                    if self._stopping():
                        return
                    await self._settle_acks()  # surface a failed ack before blocking
                    batch = self._prepare(await self._conn.call(*self._block))
                    if batch is None:
                        self._caught_up()
                        continue
                full = len(batch.ids) >= cfg.batch_size
                with anyio.CancelScope(shield=True), anyio.fail_after(cfg.shutdown_timeout):
                    started = time.perf_counter()
                    ahead = None
                    if full and not self._stopping():
                        ahead = self._conn.submit(*self._read)
                    script = self._submit(batch)
                    following = None
                    if ahead is not None:
                        following = self._prepare(await ahead)  # while the script runs
                    await self._finish(batch, script)
                    self._r._metrics.batch_seconds.observe(time.perf_counter() - started)
                if not full or (ahead is not None and following is None):
                    self._caught_up()
                batch = following
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle_acks()

    # -- decoding ------------------------------------------------------------------

    def _prepare(self, reply: Any) -> _Batch | None:
        if not reply:
            return None
        items = reply[0][1]
        if not items:
            return None
        ids = [item[0] for item in items]
        payloads = [f[1] for _, f in items if f is not None and len(f) == 2 and f[0] == FIELD]
        decoded = decode_batch(payloads) if len(payloads) == len(items) else None
        if decoded is not None:
            return _Batch(ids, decoded, self._r._reconciler.plan(decoded), None, payloads, [])
        # Something odd in the batch: entry by entry, each with its reason.
        entries: list[Entry] = []
        dead: list[Invalid] = []
        records: list[Record] = []
        for entry_id, flat in items:
            fields = None if flat is None else dict(zip(flat[::2], flat[1::2], strict=True))
            checked = check(Entry(self._stream, entry_id, fields or None))
            if isinstance(checked, Invalid):
                dead.append(checked)
            else:
                entries.append(checked.entry)
                records.append((checked.message, checked.tag, checked.index))
        return _Batch(ids, records, self._r._reconciler.plan(records), entries, None, dead)

    # -- applying ------------------------------------------------------------------

    def _submit(self, batch: _Batch) -> list[asyncio.Future[Any]]:
        sha = self._r._script.sha
        return [
            self._conn.submit("EVALSHA", sha, len(keys), *keys, *args)
            for keys, args in batch.plan.script_calls
        ]

    async def _run_one(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._conn.run_script(self._r._script, keys, args)

    async def _finish(self, batch: _Batch, script: list[asyncio.Future[Any]]) -> None:
        results: list[Any] = []
        for (keys, args), future in zip(batch.plan.script_calls, script, strict=True):
            try:
                results.append(await future)
            except NoScriptError:
                results.append(await self._retry_eval(keys, args))
            except ResponseError as exc:
                results.append(exc)
        rejected = await self._r._reconciler.outcome(batch.plan, results, self._run_one)
        dead = batch.dead + [Invalid(self._entry(batch, pos), reason) for pos, reason in rejected]
        await self._r._publisher.flush()
        self._ack(batch.ids, dead)
        for item in dead:
            reason = item.reason.split(":")[0].split(" (")[0]
            self._r._metrics.dead_letters.labels(reason=reason).inc()
            log.warning("dead_lettered", id=item.entry.id.decode(), reason=item.reason)
        newest_ms = id_tuple(batch.ids[-1])[0]
        self._lag.set(max(0.0, time.time() - newest_ms / 1000))

    async def _retry_eval(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._conn.run_script(self._r._script, keys, args)
        except ResponseError as exc:
            return exc

    def _entry(self, batch: _Batch, pos: int) -> Entry:
        if batch.entries is not None:
            return batch.entries[pos]
        assert batch.payloads is not None
        return Entry(self._stream, batch.ids[pos], {FIELD: batch.payloads[pos]})

    def _ack(self, ids: list[bytes], dead: Sequence[Invalid]) -> None:
        """Dead letters, then the XACK: sent with the next write, not waited for."""
        cfg = self._r._config
        now_ms = int(time.time() * 1000)
        for item in dead:
            self._acks.append(self._conn.submit(
                "XADD", self._r._keys.dead_letters, "MAXLEN", "~", cfg.dead_maxlen, "*",
                FIELD, item.entry.payload or b"",
                b"reason", item.reason.encode("utf-8", "replace")[:1000],
                b"stream", self._stream, b"id", item.entry.id,
                b"deliveries", item.entry.deliveries, b"consumer", cfg.consumer, b"at", now_ms,
            ))  # fmt: skip
        self._acks.append(self._conn.submit("XACK", self._stream, cfg.group, *ids))
        if len(self._acks) > 64:
            self._acks = [f for f in self._acks if not f.done() or f.exception() is not None]

    async def _settle_acks(self) -> None:
        acks, self._acks = self._acks, []
        for future in acks:
            await future  # a failure: the entries stay pending, redelivered, harmless
