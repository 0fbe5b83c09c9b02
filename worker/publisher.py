"""Publishing budget events to the events stream (and handing them to webhooks)."""

from __future__ import annotations

from collections import deque
from typing import Any

import structlog
from redis.exceptions import RedisError

from tokenfirewall.keys import Keys
from tokenfirewall.messages import FIELD, BudgetEvent, encode
from worker.metrics import Metrics
from worker.webhooks import WebhookSender

__all__ = ["Publisher"]

log = structlog.get_logger("tokenfirewall.worker")

# Events wait here while Redis is unreachable; past this, the oldest go (logged).
_MAX_UNSENT = 100_000


class Publisher:
    def __init__(
        self,
        client: Any,
        keys: Keys,
        metrics: Metrics,
        *,
        maxlen: int,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._metrics = metrics
        self._maxlen = maxlen
        self._webhooks = webhooks
        self._unsent: deque[tuple[BudgetEvent, bytes]] = deque()

    def add(self, event: BudgetEvent) -> None:
        if len(self._unsent) >= _MAX_UNSENT:
            lost, _ = self._unsent.popleft()
            log.error("budget_event_dropped", type=type(lost).__name__, user=lost.user)
        self._unsent.append((event, encode(event)))

    async def flush(self) -> None:
        """XADD every waiting event in one round trip; keep them if Redis fails."""
        if not self._unsent:
            return
        # Taken out before awaiting: several tasks flush concurrently.
        batch = list(self._unsent)
        self._unsent.clear()
        pipe = self._client.pipeline(transaction=False)
        for _, payload in batch:
            # Approximate MAXLEN: a bound on memory, cheap to enforce.
            pipe.xadd(self._keys.events, {FIELD: payload}, maxlen=self._maxlen, approximate=True)
        try:
            await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._unsent.extendleft(reversed(batch))
            self._metrics.events_unpublished.set(len(self._unsent))
            log.warning("budget_events_not_published", count=len(batch), error=repr(exc))
            return
        self._metrics.events_unpublished.set(len(self._unsent))
        for event, payload in batch:
            self._metrics.budget_events.labels(type=_type_of(event)).inc()
            if self._webhooks is not None:
                self._webhooks.submit(_type_of(event), payload)

    @property
    def unsent(self) -> int:
        return len(self._unsent)


def _type_of(event: BudgetEvent) -> str:
    tag: str = type(event).__struct_config__.tag  # type: ignore[assignment]
    return tag
