"""Usage stream entries: decoding and validation, with a reason for each rejection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

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
from tokenfirewall.periods import month_index, period_name

__all__ = ["Entry", "FastRefused", "FastSettled", "Invalid", "Valid", "check", "decode_batch"]

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
# Canonical period name of an index: what the scripts put in key names.
pname_of = lru_cache(maxsize=1024)(period_name)


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


# -- batch decoding ---------------------------------------------------------------
#
# The same messages as tokenfirewall.messages, with check()'s bounds as msgspec
# constraints, so a whole batch is decoded and validated in one C call. Any
# failure sends the batch through check() one by one, which names the reason.

_Amount = Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)]
_User = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_USER_BYTES // 4)]
_Rid = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_RID_BYTES // 4)]


_Version = Annotated[int, msgspec.Meta(ge=VERSION, le=VERSION)]


class FastSettled(msgspec.Struct, tag="settled", tag_field="type", frozen=True, kw_only=True,
                  gc=False):  # fmt: skip
    v: _Version = VERSION
    rid: _Rid
    user: _User
    period: str
    reserved: _Amount
    actual: _Amount
    model: str | None = None
    status: int = 0
    outcome: str = "complete"
    at: int = 0
    limit: _Amount = 0
    rollover: bool = False
    cap: _Amount = 0


class FastRefused(msgspec.Struct, tag="refused", tag_field="type", frozen=True, kw_only=True,
                  gc=False):  # fmt: skip
    v: _Version = VERSION
    user: _User
    period: str
    requested: int
    used: int
    limit: int
    at: int = 0


_lines_decoder = msgspec.json.Decoder(FastSettled | FastRefused)


def decode_batch(
    payloads: Sequence[bytes],
) -> list[tuple[FastSettled | FastRefused, str, int]] | None:
    """``(message, tag, month index)`` per payload, or None: then use :func:`check`.

    One JSON document per line. Sound only when each line is exactly one
    payload: no payload holds a newline, each starts with ``{`` (a blank one
    would be skipped) and the decoder finds as many values as payloads (a line
    holding two values would need a blank line to keep the count).
    """
    count = len(payloads)
    if not count:
        return []
    joined = b"\n".join(payloads)
    if (
        joined[:1] != b"{"
        or joined.count(b"\n") != count - 1
        or joined.count(b"\n{") != count - 1
    ):
        return None
    try:
        messages = _lines_decoder.decode_lines(joined)
        if len(messages) != count:
            return None
        return [(m, _tag_of(m.user), _index_of(m.period)) for m in messages]
    except (msgspec.DecodeError, msgspec.ValidationError, ConfigurationError, UnicodeError):
        return None
