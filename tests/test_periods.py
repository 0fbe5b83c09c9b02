"""Periods and the rollover rule, against an obviously-correct reference."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfirewall.errors import ConfigurationError
from tokenfirewall.periods import (
    PeriodRecord,
    bonus_after,
    history_bonuses,
    month_index,
    period_name,
    period_of,
    period_start,
    reset_at,
)


def test_last_millisecond_belongs_to_old_month() -> None:
    instant = datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert period_of(instant) == "2026-12"
    assert period_of(instant + timedelta(milliseconds=1)) == "2027-01"


def test_reset_at_is_start_of_next_month_in_utc() -> None:
    assert reset_at("2026-12") == datetime(2027, 1, 1, tzinfo=UTC)
    assert reset_at("2027-02") == datetime(2027, 3, 1, tzinfo=UTC)


def test_time_zone_moves_boundaries() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    # Midnight of January 1st in Tokyo is 15:00 UTC on December 31st.
    instant = datetime(2026, 12, 31, 15, 0, tzinfo=UTC)
    assert period_of(instant) == "2026-12"
    assert period_of(instant, tokyo) == "2027-01"
    assert period_start("2027-01", tokyo) == instant
    assert reset_at("2026-12", tokyo) == instant


def test_other_offsets_are_converted() -> None:
    minus5 = timezone(timedelta(hours=-5))
    assert period_of(datetime(2026, 12, 31, 20, 0, tzinfo=minus5)) == "2027-01"


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ConfigurationError):
        period_of(datetime(2026, 12, 1))


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "26-01", "2026/01", "abcd-ef", ""])
def test_invalid_period_names(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        month_index(bad)


@given(st.integers(min_value=0, max_value=9999 * 12 + 11))
def test_month_index_round_trip(index: int) -> None:
    assert month_index(period_name(index)) == index


def test_first_month_has_no_bonus() -> None:
    assert bonus_after(None, 100, enabled=True, max_carryover=50, monthly_limit=100) == 0


def test_disabled_rollover_has_no_bonus() -> None:
    last = PeriodRecord(index=99, monthly_limit=100, bonus=0, used=0)
    assert bonus_after(last, 100, enabled=False, max_carryover=50, monthly_limit=100) == 0


def test_worked_example() -> None:
    # limit 100k, cap 50k: use 30k in January -> 50k bonus (70k unused, capped).
    bonuses = history_bonuses(
        [(0, 100_000, 30_000), (1, 100_000, 140_000), (2, 100_000, 0)],
        enabled=True,
        max_carryover=50_000,
    )
    assert bonuses == {0: 0, 1: 50_000, 2: 10_000}


def reference_bonuses(
    used_by_month: list[int | None], limit: int, cap: int, enabled: bool
) -> list[int]:
    """Month by month: None = idle month (used 0 once the user is known)."""
    bonuses: list[int] = []
    known = False
    prev_unused = 0
    for used in used_by_month:
        bonus = min(prev_unused, cap) if (enabled and known) else 0
        bonuses.append(bonus)
        if used is not None:
            known = True
        if known:
            prev_unused = max(0, limit + bonus - (used or 0))
    return bonuses


@settings(max_examples=300)
@given(
    history=st.lists(
        st.one_of(st.none(), st.integers(min_value=0, max_value=300)), min_size=24, max_size=24
    ),
    limit=st.integers(min_value=0, max_value=200),
    cap=st.integers(min_value=0, max_value=400),
    enabled=st.booleans(),
)
def test_bonus_matches_reference_over_24_months(
    history: list[int | None], limit: int, cap: int, enabled: bool
) -> None:
    expected = reference_bonuses(history, limit, cap, enabled)
    recorded = [(i, limit, used) for i, used in enumerate(history) if used is not None]
    got = history_bonuses(recorded, enabled=enabled, max_carryover=cap)
    for index, bonus in got.items():
        assert bonus == expected[index], (index, history)
