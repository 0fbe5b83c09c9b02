"""The metered request in progress, reachable from anywhere inside it.

The middleware binds a :class:`Meter` to a context variable for the duration
of the inner app (and resets it after), so the app's own code and instrumented
HTTP clients can report tokens against the right user and reservation.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from tokenfirewall.errors import InvalidUsageError, NotInRequestError
from tokenfirewall.providers.base import MAX_USAGE_TOKENS, Usage

__all__ = ["Meter", "current_meter", "record_usage"]


@dataclass(slots=True)
class Meter:
    user_id: str
    reservation_id: str
    period: str
    reserved: int
    reported: int | None = None  # record_usage() calls, summed; wins over everything
    instrumented: int | None = None  # usage read from outgoing provider calls
    model: str | None = None

    def add_instrumented(self, usage: Usage) -> None:
        self.instrumented = (self.instrumented or 0) + usage.total


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
    meter.reported = (meter.reported or 0) + tokens


def bind(meter: Meter) -> object:
    return _current.set(meter)


def unbind(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
