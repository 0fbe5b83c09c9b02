"""Applying a batch of usage entries with one Lua call (one per user on a cluster).

The script applies each settlement and records it in the same atomic step, so
a batch replayed after a crash changes nothing; what it returns tells which
budget events became due and which closed periods got a new final bonus.

Work is split so the single-node reader can pipeline it: :meth:`Reconciler.plan`
(pure Python: group the batch per user-period, build the script arguments),
the script calls themselves (sent by whoever owns the connection), then
:meth:`Reconciler.outcome` (events, metrics, late closes, culprits of errors).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import ResponseError

from tokenfirewall.messages import (
    BudgetEvent,
    BudgetExceeded,
    BudgetThreshold,
    PeriodAdjusted,
    Refused,
    Settled,
)
from worker.closing import PeriodCloser, summary_event
from worker.codec import FastRefused, FastSettled, Invalid, Valid, pname_of
from worker.duty import Duty
from worker.redisio import run_script, run_scripts
from worker.scripts import settle_many_script

__all__ = ["Plan", "Reconciler", "Record"]

log = structlog.get_logger("tokenfirewall.worker")

# (message, tag, month index): what the codec hands over for each valid entry.
Record = tuple[Settled | Refused | FastSettled | FastRefused, str, int]
# A call's script error is narrowed down by retrying its records one by one.
Runner = Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]

_SETTLED = (Settled, FastSettled)
# Entries per script call on a single node (whole users; a bigger batch is
# split into several calls, each atomic, all acknowledged together after).
CALL_ENTRIES = 1000


@dataclass(slots=True)
class _Group:
    """Settlements of one user-period: summed into one update by the script."""

    tag: str
    idx: int
    first: Settled | FastSettled
    count: int


@dataclass(slots=True)
class _Call:
    keys: list[str]
    records: list[tuple[int, Record]]  # (position in the batch, record)
    refusals: list[tuple[int, Record]] = field(default_factory=list)
    groups: list[_Group] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    calls: list[_Call]

    @property
    def script_calls(self) -> list[tuple[list[str], list[Any]]]:
        return [(call.keys, call.args) for call in self.calls]


class Reconciler:
    def __init__(self, duty: Duty, closer: PeriodCloser) -> None:
        self._duty = duty
        self._closer = closer
        self.script = settle_many_script()
        self._thresholds = ",".join(str(p) for p in duty.config.thresholds)
        self._applied = duty.metrics.applied.labels(kind="settled")
        self._refused = duty.metrics.applied.labels(kind="refused")

    async def apply(self, items: Sequence[Valid]) -> list[Invalid]:
        """Apply ``items``; returns the entries the script rejected (to dead-letter)."""
        if not items:
            return []
        plan = self.plan([(item.message, item.tag, item.index) for item in items])
        results = await run_scripts(self._duty.client, self.script, plan.script_calls)
        rejected = await self.outcome(plan, results, self._run_one)
        return [Invalid(items[pos].entry, reason) for pos, reason in rejected]

    async def _run_one(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await run_script(self._duty.client, self.script, keys, args)

    # -- planning -------------------------------------------------------------------

    def plan(self, records: Sequence[Record]) -> Plan:
        return self._plan(list(enumerate(records)))

    def _plan(self, records: list[tuple[int, Record]]) -> Plan:
        if not records:
            return Plan([])
        users: dict[str, list[tuple[int, Record]]] = {}
        refusals: dict[str, list[tuple[int, Record]]] = {}
        for item in records:
            record = item[1]
            into = users if isinstance(record[0], _SETTLED) else refusals
            bucket = into.get(record[1])
            if bucket is None:
                into[record[1]] = [item]
            else:
                bucket.append(item)
        if self._duty.config.cluster:
            # One call per user: every key a call touches must share its slot.
            per_user: list[_Call] = []
            for tag in {**users, **refusals}:
                call = _Call([self._duty.keys.user(tag)], [])
                self._build(call, refusals.get(tag, []), [(tag, users.get(tag, []))])
                per_user.append(call)
            return Plan(per_user)
        # Single node: whole users per call, calls of about CALL_ENTRIES entries,
        # so one script never holds Redis for long while a big batch still
        # gathers each user's entries into one call.
        calls: list[_Call] = []
        chunk: list[tuple[str, list[tuple[int, Record]]]] = []
        size = 0
        pending_refusals = [item for bucket in refusals.values() for item in bucket]
        for tag, bucket in users.items():
            if chunk and size + len(bucket) > CALL_ENTRIES:
                calls.append(self._single(pending_refusals, chunk))
                pending_refusals, chunk, size = [], [], 0
            chunk.append((tag, bucket))
            size += len(bucket)
        if chunk or pending_refusals:
            calls.append(self._single(pending_refusals, chunk))
        return Plan(calls)

    def _single(
        self,
        refusals: list[tuple[int, Record]],
        users: list[tuple[str, list[tuple[int, Record]]]],
    ) -> _Call:
        call = _Call([], [])
        self._build(call, refusals, users)
        return call

    def _build(
        self,
        call: _Call,
        refusals: list[tuple[int, Record]],
        users: list[tuple[str, list[tuple[int, Record]]]],
    ) -> None:
        call.refusals = refusals
        call.records = list(refusals)
        args: list[Any] = [self._duty.keys.prefix, "", self._thresholds, len(refusals)]
        for _, (_, tag, idx) in refusals:
            args += (tag, pname_of(idx))
        groups = call.groups
        for tag, bucket in users:
            call.records += bucket
            periods: dict[int, list[Any]] = {}
            for _, (message, _, idx) in bucket:
                same = periods.get(idx)
                if same is None:
                    periods[idx] = [message]
                else:
                    same.append(message)
            first = bucket[0][1][0]
            # Hashed tags cannot be turned back into the id: the script stores it.
            args += (tag, first.user if tag.startswith("~h") else "", len(periods))
            for idx, messages in periods.items():
                head = messages[0]
                args += (pname_of(idx), idx, head.limit, int(head.rollover), head.cap,
                         len(messages))  # fmt: skip
                for m in messages:
                    args += (m.rid, m.reserved, m.actual)
                groups.append(_Group(tag, idx, head, len(messages)))
        call.args = args

    # -- results --------------------------------------------------------------------

    async def outcome(
        self, plan: Plan, results: Sequence[Any], run_one: Runner
    ) -> list[tuple[int, str]]:
        """Publish what the replies call for; returns (position, reason) of rejected records.

        ``results`` holds one reply (or exception) per call of ``plan``. A call
        that failed with a script error is retried record by record with
        ``run_one`` to find the culprit (applying is idempotent); any other
        exception is raised: the batch stays pending and is retried.
        """
        rejected: list[tuple[int, str]] = []
        replies: list[tuple[_Call, Any]] = []
        for call, result in zip(plan.calls, results, strict=True):
            if isinstance(result, ResponseError):
                for item in call.records:
                    one = self._plan([item]).calls[0]
                    try:
                        replies.append((one, await run_one(one.keys, one.args)))
                    except ResponseError as exc:
                        rejected.append((item[0], f"script error: {exc}"))
            elif isinstance(result, BaseException):
                raise result  # connection trouble: the batch stays pending, retried
            else:
                replies.append((call, result))
        late: list[tuple[str, int]] = []
        for call, reply in replies:
            late += self._outcome(call, reply)
        if late:
            # Records created after their period was closed (a late settlement
            # for a user-period nobody had reserved in): close them now.
            await self._closer.close(sorted(set(late)))
        return rejected

    def _outcome(self, call: _Call, reply: Any) -> list[tuple[str, int]]:
        firsts, flat, adjusted = reply
        at = self._closer.now_ms()
        late: list[tuple[str, int]] = []
        applied = duplicates = 0
        closable: int | None = None
        i = 0
        for group in call.groups:
            count = int(flat[i])
            if count == 0:
                duplicates += group.count
                i += 1
                continue
            applied += count
            duplicates += group.count - count
            used, limit, closed, nflags = (int(x) for x in flat[i + 1 : i + 5])
            for flag in flat[i + 5 : i + 5 + nflags]:
                self._settled_event(group.first, int(flag), used, limit, at)
            i += 5 + nflags
            if closed == 0:
                if closable is None:
                    closable = self._closer.closable_index()
                if group.idx <= closable:
                    late.append((group.tag, group.idx))
        for (_, (message, _, _)), first in zip(call.refusals, firsts, strict=True):
            if int(first) == 1 and isinstance(message, Refused | FastRefused):
                self._publish(BudgetExceeded(user=message.user, period=message.period,
                                             used=message.used, limit=message.limit,
                                             requested=message.requested, at=at))  # fmt: skip
        if call.refusals:
            self._refused.inc(len(call.refusals))
        self._applied.inc(applied)
        if duplicates:
            self._duty.metrics.duplicates.inc(duplicates)
        for summary in adjusted:
            self._duty.metrics.periods_adjusted.inc()
            self._publish(summary_event(PeriodAdjusted, summary, at))
        return late

    def _settled_event(
        self, message: Settled | FastSettled, pct: int, used: int, limit: int, at: int
    ) -> None:
        event: BudgetEvent
        if pct < 0:
            event = BudgetExceeded(
                user=message.user, period=message.period, used=used, limit=limit, at=at
            )
        else:
            event = BudgetThreshold(user=message.user, period=message.period, percent=pct,
                                    used=used, limit=limit, at=at)  # fmt: skip
        self._publish(event)

    def _publish(self, event: BudgetEvent) -> None:
        self._duty.publisher.add(event)
