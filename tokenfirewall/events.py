"""Subscribing to budget events from any Python service.

```python
async with subscribe("redis://...", group="billing", kinds={"budget.exceeded"}) as events:
    async for event in events:
        await notify(event.user)   # acknowledged once this body has finished
```

Delivery is at least once: an event is acknowledged only when the loop body
has finished with it (the next iteration starts, or the ``async with`` block
exits without an exception). One whose handler crashed is delivered again,
to this consumer when it restarts under the same name, or to another member
of the group once it has been idle for ``claim_idle_ms``.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Collection
from types import TracebackType
from typing import Any, Self

import msgspec
import structlog
from redis.exceptions import ResponseError

from tokenfirewall.connection import connect
from tokenfirewall.errors import ConfigurationError
from tokenfirewall.keys import Keys
from tokenfirewall.messages import FIELD, BudgetEvent, decode_event

__all__ = ["KINDS", "Subscription", "subscribe"]

log = structlog.get_logger("tokenfirewall.events")

KINDS = frozenset({"budget.threshold", "budget.exceeded", "period.closed", "period.adjusted"})


def subscribe(
    redis_url: str,
    *,
    group: str = "tokenfirewall-subscribers",
    consumer: str | None = None,
    kinds: Collection[str] | None = None,
    prefix: str = "tokenfirewall",
    start: str = "$",
    batch_size: int = 100,
    block_ms: int = 5000,
    claim_idle_ms: int = 60_000,
    timeout: float = 5.0,
    cluster: bool = False,
) -> Subscription:
    """Budget events for one member of a consumer group, as an async iterator.

    Members of one ``group`` share the events (each goes to one of them);
    each group sees every event. A new group starts at ``start``: ``"$"``
    (events published from now on) or ``"0"`` (everything still in the
    stream). ``consumer`` defaults to the host name: keep it stable, so a
    restarted subscriber gets back what it had not acknowledged.
    """
    unknown = set(kinds or ()) - KINDS
    if unknown:
        raise ConfigurationError(f"unknown event kinds: {sorted(unknown)}")
    # A blocking read legitimately waits block_ms before answering.
    client = connect(
        redis_url,
        cluster=cluster,
        timeout=timeout,
        socket_timeout=timeout + block_ms / 1000,
    )
    return Subscription(
        client,
        Keys(prefix).events,
        group=group,
        consumer=consumer or socket.gethostname() or "subscriber",
        kinds=frozenset(kinds) if kinds else KINDS,
        start=start,
        batch_size=batch_size,
        block_ms=block_ms,
        claim_idle_ms=claim_idle_ms,
    )


class Subscription:
    """The iterator :func:`subscribe` returns; close it with ``aclose()`` or ``async with``."""

    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        group: str,
        consumer: str,
        kinds: frozenset[str],
        start: str,
        batch_size: int,
        block_ms: int,
        claim_idle_ms: int,
    ) -> None:
        self._client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._kinds = kinds
        self._start = start
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._buffer: deque[tuple[bytes, BudgetEvent]] = deque()
        self._unacked: bytes | None = None  # the event the loop body holds
        self._prepared = False
        self._own_pending = True  # read back what we held before a restart first
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> BudgetEvent:
        if self._closed:
            raise StopAsyncIteration
        await self._ack_held()
        while not self._buffer:
            await self._fill()
        entry_id, event = self._buffer.popleft()
        self._unacked = entry_id
        return event

    async def _ack_held(self) -> None:
        if self._unacked is not None:
            await self._client.xack(self.stream, self.group, self._unacked)
            self._unacked = None

    async def _prepare(self) -> None:
        try:
            await self._client.xgroup_create(self.stream, self.group, id=self._start,
                                             mkstream=True)  # fmt: skip
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._prepared = True

    async def _fill(self) -> None:
        if not self._prepared:
            await self._prepare()
        if self._own_pending:
            items = await self._read("0", block=None)
            self._own_pending = bool(items)
        else:
            items = await self._claim() or await self._read(">", block=self._block_ms)
        skipped = [entry_id for entry_id, fields in items if not self._keep(entry_id, fields)]
        if skipped:
            await self._client.xack(self.stream, self.group, *skipped)

    async def _read(self, start: str, block: int | None) -> list[tuple[bytes, Any]]:
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self._batch_size, block=block
        )
        return [item for _, items in reply or () for item in items]

    async def _claim(self) -> list[tuple[bytes, Any]]:
        reply = await self._client.xautoclaim(
            self.stream, self.group, self.consumer, self._claim_idle_ms, count=self._batch_size
        )
        return [item for item in reply[1] if item[0] is not None]

    def _keep(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> bool:
        """Buffer a wanted event; anything else is acknowledged and skipped."""
        payload = (fields or {}).get(FIELD)
        if payload is None:
            return False
        try:
            event = decode_event(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("budget_event_undecodable", id=entry_id.decode(), error=str(exc))
            return False
        kind: str = type(event).__struct_config__.tag  # type: ignore[assignment]
        if kind not in self._kinds:
            return False
        self._buffer.append((entry_id, event))
        return True

    async def aclose(self, *, ack: bool = False) -> None:
        """Stop; the held event is acknowledged only with ``ack=True``."""
        if self._closed:
            return
        self._closed = True
        try:
            if ack:
                await self._ack_held()
        finally:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        # Create the group now: with start="$" the block sees every event
        # published after it was entered.
        await self._prepare()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A clean exit (end of the block, or break) means the body finished.
        await self.aclose(ack=exc_type is None)
