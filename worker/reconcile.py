"""Applying a batch of usage entries with one Lua call (one per user on a cluster).

The script applies each settlement and records it in the same atomic step, so
a batch replayed after a crash changes nothing; what it returns tells which
budget events became due and which closed periods got a new final bonus.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from redis.exceptions import ResponseError

from tokenfirewall.keys import Keys
from tokenfirewall.messages import (
    BudgetEvent,
    BudgetExceeded,
    BudgetThreshold,
    PeriodAdjusted,
    Refused,
    Settled,
)
from worker.closing import PeriodCloser, summary_event
from worker.codec import Invalid, Valid
from worker.config import WorkerConfig
from worker.metrics import Metrics
from worker.publisher import Publisher
from worker.redisio import run_script, run_scripts
from worker.scripts import settle_many_script

__all__ = ["Reconciler"]

log = structlog.get_logger("tokenfirewall.worker")

_encoder = msgspec.json.Encoder()


def _row(item: Valid) -> list[Any]:
    m = item.message
    # Hashed tags cannot be turned back into the id: the script stores it.
    user = m.user if item.tag.startswith("~h") else ""
    if isinstance(m, Refused):
        return ["r", item.tag, item.index, "", 0, 0, 0, 0, 0, user]
    return ["s", item.tag, item.index, m.rid, m.reserved, m.actual, m.limit,
            int(m.rollover), m.cap, user]  # fmt: skip


class Reconciler:
    def __init__(
        self,
        client: Any,
        keys: Keys,
        config: WorkerConfig,
        metrics: Metrics,
        publisher: Publisher,
        closer: PeriodCloser,
    ) -> None:
        self._client = client
        self._keys = keys
        self._config = config
        self._metrics = metrics
        self._publisher = publisher
        self._closer = closer
        self._script = settle_many_script()
        self._thresholds = ",".join(str(p) for p in config.thresholds)

    async def apply(self, items: Sequence[Valid]) -> list[Invalid]:
        """Apply ``items``; returns the entries the script rejected (to dead-letter)."""
        if not items:
            return []
        groups = self._groups(items)
        results = await run_scripts(
            self._client, self._script, [(keys, self._args(group)) for keys, group in groups]
        )
        rejected: list[Invalid] = []
        replies: list[tuple[Sequence[Valid], Any]] = []
        for (keys, group), result in zip(groups, results, strict=True):
            if isinstance(result, ResponseError):
                rejected += await self._isolate(keys, group, replies)
            elif isinstance(result, Exception):
                raise result  # connection trouble: the batch stays pending, retried
            else:
                replies.append((group, result))
        late: list[tuple[str, int]] = []
        for applied, reply in replies:
            late += self._outcome(applied, reply)
        if late:
            # Records created after their period was closed (a late settlement
            # for a user-period nobody had reserved in): close them now.
            await self._closer.close(sorted(set(late)))
        return rejected

    def _groups(self, items: Sequence[Valid]) -> list[tuple[list[str], list[Valid]]]:
        if not self._config.cluster:
            return [([], list(items))]
        # One call per user: every key a call touches must share its slot.
        by_tag: dict[str, list[Valid]] = defaultdict(list)
        for item in items:
            by_tag[item.tag].append(item)
        return [([self._keys.user(tag)], group) for tag, group in by_tag.items()]

    def _args(self, group: Sequence[Valid]) -> tuple[Any, ...]:
        rows = _encoder.encode([_row(item) for item in group])
        return (self._keys.prefix, "", self._thresholds, rows)

    async def _isolate(
        self, keys: list[str], group: Sequence[Valid], replies: list[tuple[Sequence[Valid], Any]]
    ) -> list[Invalid]:
        """A script error fails the whole call: retry one by one to find the culprit."""
        rejected: list[Invalid] = []
        for item in group:
            one_keys = [self._keys.user(item.tag)] if keys else []
            try:
                reply = await run_script(self._client, self._script, one_keys, self._args([item]))
            except ResponseError as exc:
                rejected.append(Invalid(item.entry, f"script error: {exc}"))
                continue
            replies.append(([item], reply))
        return rejected

    def _outcome(self, group: Sequence[Valid], reply: Any) -> list[tuple[str, int]]:
        results, adjusted = reply
        at = self._closer.now_ms()
        closable = self._closer.closable_index()
        late: list[tuple[str, int]] = []
        refused = applied = duplicates = 0
        for item, result in zip(group, results, strict=True):
            message = item.message
            if isinstance(message, Refused):
                refused += 1
                if int(result[0]) == 1:
                    self._publish(BudgetExceeded(user=message.user, period=message.period,
                                                 used=message.used, limit=message.limit,
                                                 requested=message.requested, at=at))
                continue
            if result[0] == 0:
                duplicates += 1
                continue
            applied += 1
            if len(result) > 5:
                self._settled_events(message, result, at)
            if result[4] == 0 and item.index <= closable:
                late.append((item.tag, item.index))
        self._metrics.applied.labels(kind="refused").inc(refused)
        self._metrics.applied.labels(kind="settled").inc(applied)
        self._metrics.duplicates.inc(duplicates)
        for summary in adjusted:
            self._metrics.periods_adjusted.inc()
            self._publish(summary_event(PeriodAdjusted, summary, at))
        return late

    def _settled_events(self, message: Settled, result: Sequence[Any], at: int) -> None:
        used, limit = int(result[2]), int(result[3])
        for flag in result[5:]:
            pct = int(flag)
            if pct < 0:
                event: BudgetEvent = BudgetExceeded(
                    user=message.user, period=message.period, used=used, limit=limit, at=at
                )
            else:
                event = BudgetThreshold(user=message.user, period=message.period,
                                        percent=pct, used=used, limit=limit, at=at)
            self._publish(event)

    def _publish(self, event: BudgetEvent) -> None:
        self._publisher.add(event)
