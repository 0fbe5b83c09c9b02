"""Public configuration objects: ``UserBudget``, ``Rollover`` and ``BudgetInfo``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from tokenfirewall.errors import ConfigurationError

if TYPE_CHECKING:
    from tokenfirewall.request import Request
    from tokenfirewall.types import ASGIApp

__all__ = ["BudgetInfo", "Policy", "Rollover", "UserBudget"]

MAX_LIMIT = 10**15  # far above any real budget, far below Lua's 2**53 exact integers

UserIdExtractor = Callable[["Request"], "str | Awaitable[str | None] | None"]
LimitSource = int | Callable[[str], "int | Awaitable[int]"]
ExceededHandler = Callable[["Request", "BudgetInfo"], "ASGIApp | Awaitable[ASGIApp]"]


def check_amount(name: str, value: Any, *, maximum: int = MAX_LIMIT) -> int:
    """Accept a non-negative int (not bool) up to ``maximum``, else raise clearly."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ConfigurationError(f"{name} must be between 0 and {maximum}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Rollover:
    """Carry unused tokens into the next month, up to ``max_carryover``.

    ``max_carryover=None`` caps the carry-over at one monthly limit.
    """

    enabled: bool = False
    max_carryover: int | None = None

    def __post_init__(self) -> None:
        if self.max_carryover is not None:
            check_amount("max_carryover", self.max_carryover)


@dataclass(frozen=True, slots=True)
class UserBudget:
    extract_user_id: UserIdExtractor
    monthly_token_limit: LimitSource
    rollover: Rollover = Rollover()
    on_budget_exceeded: ExceededHandler | None = None
    anonymous: Literal["allow", "reject"] = "allow"

    def __post_init__(self) -> None:
        if not callable(self.extract_user_id):
            raise ConfigurationError("extract_user_id must be callable")
        if not callable(self.monthly_token_limit):
            check_amount("monthly_token_limit", self.monthly_token_limit)
        if self.anonymous not in ("allow", "reject"):
            raise ConfigurationError("anonymous must be 'allow' or 'reject'")


@dataclass(frozen=True, slots=True)
class Policy:
    """The policy in force for one user-period; stored with the period record."""

    monthly_limit: int
    rollover: bool
    max_carryover: int

    @classmethod
    def resolve(cls, monthly_limit: int, rollover: Rollover) -> Policy:
        cap = rollover.max_carryover
        return cls(
            monthly_limit=monthly_limit,
            rollover=rollover.enabled,
            max_carryover=monthly_limit if cap is None else cap,
        )


@dataclass(frozen=True, slots=True)
class BudgetInfo:
    """A user's budget in one period, as seen by a pre-check."""

    user_id: str
    period: str
    used: int
    limit: int
    monthly_limit: int
    bonus: int
    remaining: int
    requested: int
    reset_at: datetime
