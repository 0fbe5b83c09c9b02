"""In-process storage: the embedded default, with the same semantics as Redis.

Every operation runs without awaiting inside a lock, so concurrent requests on
one event loop (or several threads) see each reserve as atomic, exactly like
the Lua scripts of :class:`RedisStorage`. Settlements apply immediately: there
is no worker in a single process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from tokenfirewall.config import Policy
from tokenfirewall.messages import Refused, Settled
from tokenfirewall.periods import month_index
from tokenfirewall.storage.base import PeriodSnapshot, ReserveRequest, ReserveResult, Storage

__all__ = ["LOOKBACK_MONTHS", "MemoryStorage"]

# A user with no record in this many earlier months starts afresh (as in the
# Lua scripts' LOOKBACK).
LOOKBACK_MONTHS = 24


@dataclass(slots=True)
class _Record:
    monthly_limit: int
    bonus: int
    bonus_final: bool
    charged: int = 0
    used: int = 0
    granted: int = 0
    closed: bool = False
    refused: bool = False

    @property
    def limit(self) -> int:
        return self.monthly_limit + self.bonus + self.granted


@dataclass(slots=True)
class _User:
    override: int | None = None
    periods: dict[int, _Record] = field(default_factory=dict)
    open: dict[str, tuple[int, int, int]] = field(
        default_factory=dict
    )  # rid -> idx, amount, expiry
    released: dict[str, tuple[int, int]] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)


class MemoryStorage(Storage):
    """Budgets in this process's memory. Not shared between processes."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock
        self._users: dict[str, _User] = {}
        self._lock = threading.Lock()

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        with self._lock:
            user = self._users.setdefault(request.user_id, _User())
            self._release_expired(user, request.now_ms)
            idx = month_index(request.period)
            record = user.periods.get(idx) or self._open_period(user, idx, request.policy)
            if request.reservation_id in user.open:  # a retry: charged already
                return self._result(record, admitted=True, first_refusal=False)
            fits = record.charged + request.estimate <= record.limit
            first_refusal = not fits and not record.refused
            if fits:
                record.charged += request.estimate
                user.open[request.reservation_id] = (idx, request.estimate, request.expires_at_ms)
            else:
                record.refused = True
            return self._result(record, admitted=fits, first_refusal=first_refusal)

    @staticmethod
    def _result(record: _Record, *, admitted: bool, first_refusal: bool) -> ReserveResult:
        return ReserveResult(
            admitted=admitted,
            charged=record.charged,
            limit=record.limit,
            monthly_limit=record.monthly_limit,
            bonus=record.bonus,
            first_refusal=first_refusal,
        )

    def _open_period(self, user: _User, idx: int, policy: Policy) -> _Record:
        limit = policy.monthly_limit if user.override is None else user.override
        bonus, final = 0, True
        earlier = [i for i in user.periods if idx - LOOKBACK_MONTHS <= i < idx]
        if policy.rollover and earlier:
            last_idx = max(earlier)
            last = user.periods[last_idx]
            # Charged (usage plus open reservations) is never below final usage,
            # so this provisional bonus never exceeds the final one.
            unused = max(0, last.limit - last.charged)
            idle = idx - last_idx - 1
            bonus = min(unused + idle * limit, policy.max_carryover)
            final = last.closed
        record = _Record(monthly_limit=limit, bonus=bonus, bonus_final=final)
        user.periods[idx] = record
        return record

    def _release_expired(self, user: _User, now_ms: int) -> None:
        for rid, (idx, amount, expiry) in list(user.open.items()):
            if expiry <= now_ms:
                del user.open[rid]
                user.periods[idx].charged -= amount
                user.released[rid] = (idx, amount)

    async def settle(self, settlement: Settled) -> None:
        self.settle_soon(settlement)

    def settle_soon(self, settlement: Settled) -> None:
        """Applied at once: nothing to wait for in process."""
        with self._lock:
            user = self._users.setdefault(settlement.user, _User())
            idx = month_index(settlement.period)
            if settlement.rid in user.open:
                idx, amount, _ = user.open.pop(settlement.rid)
                delta = settlement.actual - amount
            elif settlement.rid in user.released:
                idx, _ = user.released.pop(settlement.rid)
                delta = settlement.actual
            elif settlement.reserved == 0 and settlement.rid not in user.applied:
                user.applied.add(settlement.rid)
                delta = settlement.actual
            else:
                return  # already applied: settling twice must change nothing
            record = user.periods.get(idx) or self._open_period(
                user,
                idx,
                Policy(settlement.limit, settlement.rollover, settlement.cap),
            )
            record.charged += delta
            record.used += settlement.actual

    async def refused(self, refusal: Refused) -> None:
        """Nothing to publish in process: the refusal is already recorded."""

    async def snapshot(self, user_id: str, period: str) -> PeriodSnapshot | None:
        with self._lock:
            user = self._users.get(user_id)
            idx = month_index(period)
            record = user.periods.get(idx) if user else None
            if user is None or record is None:
                return None
            return PeriodSnapshot(
                user_id=user_id,
                period=period,
                charged=record.charged,
                used=record.used,
                monthly_limit=record.monthly_limit,
                bonus=record.bonus,
                granted=record.granted,
                bonus_final=record.bonus_final,
                closed=record.closed,
                open_reservations=sum(1 for i, _, _ in user.open.values() if i == idx),
            )
