"""The storage interface every backend implements, and the values it exchanges."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from tokenfirewall.config import Policy
from tokenfirewall.messages import Refused, Settled

__all__ = ["PeriodSnapshot", "ReserveRequest", "ReserveResult", "Storage"]

DEFAULT_THRESHOLDS = (80, 90)

# The event loop keeps only weak references to tasks.
_pending: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    user_id: str
    period: str
    estimate: int
    policy: Policy
    reservation_id: str
    expires_at_ms: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    admitted: bool
    charged: int  # tokens charged in the period after this call (before it, if refused)
    limit: int  # effective limit: monthly limit + bonus + top-ups
    monthly_limit: int
    bonus: int
    first_refusal: bool = False


@dataclass(frozen=True, slots=True)
class PeriodSnapshot:
    """One stored user-period, for status queries and reports."""

    user_id: str
    period: str
    charged: int
    used: int
    monthly_limit: int
    bonus: int
    granted: int
    bonus_final: bool
    closed: bool
    open_reservations: int

    @property
    def limit(self) -> int:
        return self.monthly_limit + self.bonus + self.granted


class Storage(abc.ABC):
    """Where budgets live. One pre-check is one atomic :meth:`reserve`."""

    #: The storage's notion of now. The middleware takes its time from here
    #: when it is given no ``clock`` of its own, so a test can move one clock
    #: across a month end for the whole stack.
    clock: Callable[[], datetime] | None = None

    @abc.abstractmethod
    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Charge ``estimate`` if it fits the effective limit, atomically; else charge nothing."""

    @abc.abstractmethod
    async def settle(self, settlement: Settled) -> None:
        """Replace a reservation by the tokens actually used (exactly once per id)."""

    def settle_soon(self, settlement: Settled) -> None:
        """Hand a settlement over without waiting; must never raise.

        The middleware calls this when a response ends, so the request does
        not wait on storage. Backends override it with something cheaper than
        this default, a task running :meth:`settle`.
        """
        task = asyncio.get_running_loop().create_task(self.settle(settlement))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    @abc.abstractmethod
    async def refused(self, refusal: Refused) -> None:
        """Report the first refusal of a user-period."""

    @abc.abstractmethod
    async def snapshot(self, user_id: str, period: str) -> PeriodSnapshot | None:
        """The stored record of a user-period, or None when the user never used it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Flush what is buffered and release connections."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
