"""Usage stream entries: decoding and validation, with a reason for each rejection."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import msgspec

from tokenfirewall.config import MAX_LIMIT
from tokenfirewall.errors import ConfigurationError
from tokenfirewall.keys import encode_user_id
from tokenfirewall.messages import (
    FIELD,
    VERSION,
    Refused,
    Settled,
    UsageMessage,
    decode_usage,
)
from tokenfirewall.periods import month_index

__all__ = ["Entry", "Invalid", "Valid", "check"]

MAX_RID_BYTES = 800
MAX_USER_BYTES = 4096


@dataclass(slots=True)
class Entry:
    """One stream entry as delivered: ``fields`` is None when it was trimmed away."""

    stream: str
    id: bytes
    fields: dict[bytes, bytes] | None
    deliveries: int = 1

    @property
    def payload(self) -> bytes | None:
        return None if self.fields is None else self.fields.get(FIELD)


@dataclass(slots=True)
class Valid:
    entry: Entry
    message: UsageMessage
    tag: str
    index: int


@dataclass(slots=True)
class Invalid:
    entry: Entry
    reason: str


# Hot users and the current period repeat in every batch: compute them once.
_tag_of = lru_cache(maxsize=65_536)(encode_user_id)
_index_of = lru_cache(maxsize=1024)(month_index)


def _amount(name: str, value: int) -> None:
    if not 0 <= value <= MAX_LIMIT:
        raise ValueError(f"{name} out of range: {value}")


def _validate(message: UsageMessage) -> int:
    if message.v != VERSION:
        raise ValueError(f"unsupported message version {message.v}")
    # A character is at most 4 bytes: the length bound needs no encoding.
    if not message.user or len(message.user) > MAX_USER_BYTES // 4:
        raise ValueError("bad user id")
    index = _index_of(message.period)
    if isinstance(message, Settled):
        if not message.rid or len(message.rid) > MAX_RID_BYTES // 4:
            raise ValueError("bad reservation id")
        _amount("reserved", message.reserved)
        _amount("actual", message.actual)
        _amount("limit", message.limit)
        _amount("cap", message.cap)
    return index


def check(entry: Entry) -> Valid | Invalid:
    """Decode one entry; anything the scripts must not see comes back Invalid."""
    payload = entry.payload
    if payload is None:
        return Invalid(entry, "undecodable: no 'm' field")
    try:
        message = decode_usage(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Invalid(entry, f"undecodable: {exc}")
    try:
        index = _validate(message)
    except (ValueError, ConfigurationError, UnicodeError) as exc:
        return Invalid(entry, f"invalid: {exc}")
    return Valid(entry, message, _tag_of(message.user), index)


def is_refusal(message: UsageMessage) -> bool:
    return isinstance(message, Refused)
