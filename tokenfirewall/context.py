"""The metered request in progress, reachable from anywhere inside it.

The middleware binds a :class:`Meter` to a context variable for the duration
of the inner app (and resets it after), so the app's own code and instrumented
HTTP clients can report tokens against the right user and reservation.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import structlog

from tokenfirewall.errors import InvalidUsageError, NotInRequestError
from tokenfirewall.providers.base import MAX_USAGE_TOKENS, Usage

__all__ = ["Meter", "current_meter", "record_usage"]

log = structlog.get_logger("tokenfirewall")


@dataclass(slots=True)
class Meter:
    user_id: str
    reservation_id: str
    period: str
    reserved: int
    reported: int | None = None  # record_usage() calls, summed; wins over everything
    instrumented: int | None = None  # usage read from outgoing provider calls
    model: str | None = None
    settled: bool = False  # the settlement was computed: later usage cannot count

    def add_instrumented(self, usage: Usage) -> None:
        self.add_instrumented_tokens(usage.total)

    def add_instrumented_tokens(self, tokens: int) -> None:
        """Add usage read from an outgoing provider call (0 counts: it means
        "instrumented, and free", which still outranks parsed usage)."""
        if self.settled:
            # A stream consumed after the app answered: too late to bill.
            log.warning("late_instrumented_usage", rid=self.reservation_id, tokens=tokens)
            return
        tokens = max(0, min(tokens, MAX_USAGE_TOKENS))
        self.instrumented = min((self.instrumented or 0) + tokens, MAX_USAGE_TOKENS)


_current: ContextVar[Meter | None] = ContextVar("tokenfirewall_meter", default=None)


def current_meter() -> Meter | None:
    return _current.get()


def record_usage(tokens: int) -> None:
    """Add ``tokens`` to the current metered request's actual usage.

    Calls accumulate, and reported usage takes precedence over usage parsed
    from the response or from instrumented clients.
    """
    meter = _current.get()
    if meter is None:
        raise NotInRequestError("record_usage() called outside a metered request")
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise InvalidUsageError(f"tokens must be an int, got {type(tokens).__name__}")
    if not 0 <= tokens <= MAX_USAGE_TOKENS:
        raise InvalidUsageError(f"tokens must be between 0 and {MAX_USAGE_TOKENS}, got {tokens}")
    meter.reported = min((meter.reported or 0) + tokens, MAX_USAGE_TOKENS)


def bind(meter: Meter) -> object:
    return _current.set(meter)


def unbind(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
