"""Releasing reservations whose settlement never came (the app process died)."""

from __future__ import annotations

import structlog

from tokenfirewall.messages import PeriodAdjusted
from worker.closing import summary_event
from worker.duty import Duty
from worker.redisio import glob_escape, run_scripts, scan_keys, tag_of
from worker.scripts import expire_script

__all__ = ["ReservationSweeper"]

log = structlog.get_logger("tokenfirewall.worker")

_CHUNK = 500


class ReservationSweeper:
    def __init__(self, duty: Duty) -> None:
        self._duty = duty
        self._script = expire_script()

    async def sweep(self) -> int:
        """Release every expired reservation; returns how many were released."""
        # 're[ls]*' finds users with open reservations ('resv') and users with
        # released markers only ('rel'), whose old markers must be forgotten.
        pattern = f"{glob_escape(self._duty.keys.prefix)}:re[ls]*"
        tags: set[str] = set()
        async for key in scan_keys(self._duty.client, pattern):
            tag = tag_of(key)
            if tag is not None:
                tags.add(tag)
        ordered = sorted(tags)
        released = 0
        for start in range(0, len(ordered), _CHUNK):
            released += await self._expire(ordered[start : start + _CHUNK])
        if released:
            log.info("reservations_expired", count=released)
        return released

    async def _expire(self, tags: list[str]) -> int:
        now = self._duty.clock()
        now_ms = int(now.timestamp() * 1000)
        retention_ms = self._duty.config.retention_seconds * 1000
        forget = now_ms - retention_ms if retention_ms else 0
        calls = [
            (
                [self._duty.keys.reservations(tag), self._duty.keys.released(tag)],
                (self._duty.keys.prefix, tag, now_ms, forget),
            )
            for tag in tags
        ]
        count = 0
        for result in await run_scripts(self._duty.client, self._script, calls):
            if isinstance(result, Exception):
                raise result
            released, tokens, adjusted = result
            count += int(released)
            self._duty.metrics.tokens_released.inc(int(tokens))
            for summary in adjusted:
                self._duty.metrics.periods_adjusted.inc()
                self._duty.publisher.add(summary_event(PeriodAdjusted, summary, now_ms))
        self._duty.metrics.reservations_expired.inc(count)
        await self._duty.publisher.flush()
        return count
