"""One usage stream (shard) read through the consumer group: read, claim, ack, dead-letter."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from tokenfirewall.keys import Keys
from tokenfirewall.messages import FIELD
from worker.codec import Entry, Invalid
from worker.config import WorkerConfig

__all__ = ["ShardConsumer", "id_tuple"]


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
