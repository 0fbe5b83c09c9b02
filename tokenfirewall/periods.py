"""Budget periods (calendar months) and the rollover rule, as pure functions.

A period is named ``YYYY-MM``. Internally a period is also a *month index*
(``year * 12 + month - 1``) so that gaps between periods are plain subtraction;
the Lua scripts use the same numbering.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache

from tokenfirewall.errors import ConfigurationError

__all__ = [
    "PeriodRecord",
    "bonus_after",
    "month_index",
    "period_name",
    "period_of",
    "period_start",
    "reset_at",
]


@lru_cache(maxsize=256)
def month_index(period: str) -> int:
    """``"2026-12"`` -> ``2026 * 12 + 11``."""
    year, sep, month = period.partition("-")
    if not sep or len(year) != 4 or len(month) != 2 or not (year + month).isdigit():
        raise ConfigurationError(f"invalid period {period!r}, expected YYYY-MM")
    m = int(month)
    if not 1 <= m <= 12:
        raise ConfigurationError(f"invalid period {period!r}, month out of range")
    return int(year) * 12 + m - 1


def period_name(index: int) -> str:
    year, month0 = divmod(index, 12)
    return f"{year:04d}-{month0 + 1:02d}"


def _require_aware(instant: datetime) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ConfigurationError("clock must return an aware datetime")


def period_of(instant: datetime, tz: tzinfo | None = None) -> str:
    """The period an instant belongs to: UTC calendar months, or months of ``tz``."""
    _require_aware(instant)
    local = instant.astimezone(tz or UTC)
    return f"{local.year:04d}-{local.month:02d}"


def period_start(period: str, tz: tzinfo | None = None) -> datetime:
    """The first instant of a period, as an aware UTC datetime."""
    year, month0 = divmod(month_index(period), 12)
    # Build in the period's zone, then convert: the month starts at local midnight.
    local = datetime(year, month0 + 1, 1, tzinfo=tz or UTC)
    return local.astimezone(UTC)


@lru_cache(maxsize=256)
def reset_at(period: str, tz: tzinfo | None = None) -> datetime:
    """When the budget of ``period`` resets: the start of the next period."""
    return period_start(period_name(month_index(period) + 1), tz)


@dataclass(frozen=True, slots=True)
class PeriodRecord:
    """What is stored about one user-period, as far as rollover is concerned."""

    index: int
    monthly_limit: int
    bonus: int
    used: int

    @property
    def effective_limit(self) -> int:
        return self.monthly_limit + self.bonus

    @property
    def unused(self) -> int:
        return max(0, self.effective_limit - self.used)


def bonus_after(
    last: PeriodRecord | None,
    target: int,
    *,
    enabled: bool,
    max_carryover: int,
    monthly_limit: int,
) -> int:
    """The bonus of period ``target`` given the user's latest earlier period ``last``.

    Months between ``last`` and ``target`` in which the user did nothing count
    with used = 0 and the monthly limit in force at ``target`` (the only one
    known), so each idle month carries ``min(limit + bonus, cap)`` forward; the
    closed form of that chain is ``min(unused(last) + k * limit, cap)`` after
    ``k`` idle months, which is what the Lua scripts compute too.
    """
    if not enabled or last is None or last.index >= target:
        return 0
    idle = target - last.index - 1
    return min(last.unused + idle * max(0, monthly_limit), max(0, max_carryover))


def history_bonuses(
    months: Iterable[tuple[int, int, int]],
    *,
    enabled: bool,
    max_carryover: int,
) -> dict[int, int]:
    """Bonuses of each recorded month from ``(index, monthly_limit, used)`` in order."""
    bonuses: dict[int, int] = {}
    last: PeriodRecord | None = None
    for index, limit, used in months:
        bonus = bonus_after(
            last, index, enabled=enabled, max_carryover=max_carryover, monthly_limit=limit
        )
        bonuses[index] = bonus
        last = PeriodRecord(index=index, monthly_limit=limit, bonus=bonus, used=used)
    return bonuses
