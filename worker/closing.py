"""Closing ended periods: final bonuses from reconciled usage, ``period.closed`` events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog

from tokenfirewall.keys import decode_user_tag
from tokenfirewall.messages import PeriodAdjusted, PeriodClosed
from tokenfirewall.periods import month_index, period_name, period_of
from worker.duty import Duty
from worker.redisio import glob_escape, run_scripts, scan_keys, tag_of
from worker.scripts import close_script

__all__ = ["PeriodCloser", "summary_event"]

log = structlog.get_logger("tokenfirewall.worker")

_CHUNK = 500


def summary_event(
    kind: type[PeriodClosed] | type[PeriodAdjusted], summary: Sequence[Any], at: int
) -> PeriodClosed | PeriodAdjusted:
    """Build an event from a script summary ``{tag, idx, used, limit, next, bonus, id}``."""
    tag, idx, used, limit, next_idx, next_bonus, stored = summary
    return kind(
        user=decode_user_tag(tag.decode("utf-8", "surrogateescape"), stored or None),
        period=period_name(int(idx)),
        used=int(used),
        limit=int(limit),
        next_period=period_name(int(next_idx)),
        next_bonus=int(next_bonus),
        at=at,
    )


class PeriodCloser:
    def __init__(self, duty: Duty) -> None:
        self._duty = duty
        self._script = close_script()
        self._swept_through: int | None = None  # every period up to here is closed

    def closable_index(self) -> int:
        """The latest period whose end plus the grace window has passed."""
        shifted = self._duty.clock() - timedelta(seconds=self._duty.config.grace_seconds)
        return month_index(period_of(shifted, self._duty.config.timezone)) - 1

    def now_ms(self) -> int:
        return int(self._duty.clock().timestamp() * 1000)

    async def close(self, pairs: Sequence[tuple[str, int]]) -> int:
        """Close these user-periods (already closed ones are skipped by the script)."""
        closed = 0
        retention = self._duty.config.retention_seconds
        for start in range(0, len(pairs), _CHUNK):
            chunk = pairs[start : start + _CHUNK]
            prefix = self._duty.keys.prefix
            calls = [
                ([self._duty.keys.period(tag, period_name(idx))], (prefix, tag, idx, retention))
                for tag, idx in chunk
            ]
            results = await run_scripts(self._duty.client, self._script, calls)
            at = self.now_ms()
            for result in results:
                if isinstance(result, Exception):
                    raise result
                if int(result[0]) == 1:
                    closed += 1
                    self._duty.publisher.add(summary_event(PeriodClosed, result[1], at))
            await self._duty.publisher.flush()
        self._duty.metrics.periods_closed.inc(closed)
        return closed

    async def sweep(self) -> int:
        """Close every ended period not closed yet; the first sweep catches up on all."""
        target = self.closable_index()
        if self._swept_through is not None and target <= self._swept_through:
            return 0
        base = f"{glob_escape(self._duty.keys.prefix)}:period:"
        if self._swept_through is None:
            patterns = [base + "*"]
        else:
            patterns = [
                f"{base}*:{period_name(idx)}" for idx in range(self._swept_through + 1, target + 1)
            ]
        closed = 0
        for pattern in patterns:
            closed += await self.close(await self._ended(pattern, target))
        self._swept_through = target
        if closed:
            log.info("periods_closed", count=closed, through=period_name(target))
        return closed

    async def _ended(self, pattern: str, target: int) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        async for key in scan_keys(self._duty.client, pattern):
            tag = tag_of(key)
            try:
                idx = month_index(key[-7:].decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                continue
            if tag is not None and idx <= target:
                found.append((tag, idx))
        return found
