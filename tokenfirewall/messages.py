"""Stream messages: a tagged union of msgspec Structs, JSON on the wire.

Every entry of the usage and events streams has one field, ``m``, holding a
JSON object with a ``type`` tag and a version ``v``, so any language can read
them. ``docs/events.md`` documents each field.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "VERSION",
    "BudgetEvent",
    "BudgetExceeded",
    "BudgetThreshold",
    "PeriodAdjusted",
    "PeriodClosed",
    "Refused",
    "Settled",
    "UsageMessage",
    "decode_event",
    "decode_usage",
    "encode",
]

VERSION = 1
FIELD = b"m"


class Settled(msgspec.Struct, tag="settled", tag_field="type", frozen=True, kw_only=True):
    """A metered request ended: replace its reservation by the tokens actually used.

    ``reserved == 0`` marks a request admitted without a reservation (Redis was
    down and the middleware failed open); it is applied once, by its id.
    """

    v: int = VERSION
    rid: str
    user: str
    period: str
    reserved: int
    actual: int
    model: str | None = None
    status: int = 0
    outcome: str = "complete"  # complete | error | disconnect
    at: int = 0  # unix ms
    limit: int = 0  # the policy in force, for a record created by this settlement
    rollover: bool = False
    cap: int = 0


class Refused(msgspec.Struct, tag="refused", tag_field="type", frozen=True, kw_only=True):
    """The first refusal of a user-period (the worker turns it into budget.exceeded)."""

    v: int = VERSION
    user: str
    period: str
    requested: int
    used: int
    limit: int
    at: int = 0


UsageMessage = Settled | Refused


class BudgetThreshold(
    msgspec.Struct, tag="budget.threshold", tag_field="type", frozen=True, kw_only=True
):
    v: int = VERSION
    user: str
    period: str
    percent: int
    used: int
    limit: int
    at: int = 0


class BudgetExceeded(
    msgspec.Struct, tag="budget.exceeded", tag_field="type", frozen=True, kw_only=True
):
    v: int = VERSION
    user: str
    period: str
    used: int
    limit: int
    requested: int = 0
    at: int = 0


class PeriodClosed(
    msgspec.Struct, tag="period.closed", tag_field="type", frozen=True, kw_only=True
):
    v: int = VERSION
    user: str
    period: str
    used: int
    limit: int
    next_period: str
    next_bonus: int
    at: int = 0


class PeriodAdjusted(
    msgspec.Struct, tag="period.adjusted", tag_field="type", frozen=True, kw_only=True
):
    v: int = VERSION
    user: str
    period: str
    used: int
    limit: int
    next_period: str
    next_bonus: int
    at: int = 0


BudgetEvent = BudgetThreshold | BudgetExceeded | PeriodClosed | PeriodAdjusted

_encoder = msgspec.json.Encoder()
_usage_decoder = msgspec.json.Decoder(UsageMessage)
_event_decoder = msgspec.json.Decoder(BudgetEvent)


def encode(message: UsageMessage | BudgetEvent) -> bytes:
    return _encoder.encode(message)


def decode_usage(raw: bytes) -> UsageMessage:
    """Raise ``msgspec.DecodeError``/``ValidationError`` on anything malformed."""
    return _usage_decoder.decode(raw)


def decode_event(raw: bytes) -> BudgetEvent:
    return _event_decoder.decode(raw)
