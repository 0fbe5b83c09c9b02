"""Every Redis key name, in one place.

Each per-user key embeds the encoded user id as a Redis Cluster hash tag, so one
user's keys share a slot and one script can update them atomically.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

__all__ = ["MAX_RAW_ID_BYTES", "Keys", "decode_user_tag", "encode_user_id"]

MAX_RAW_ID_BYTES = 128
# Ids longer than this are hashed: keys stay bounded whatever the caller sends.
_MAX_B64_SOURCE_BYTES = 96


def _is_plain(user_id: str) -> bool:
    if not user_id or len(user_id) > MAX_RAW_ID_BYTES or user_id[0] == "~":
        return False
    return all("!" <= ch <= "~" and ch not in "{}" for ch in user_id)


def encode_user_id(user_id: str) -> str:
    """Map any user id injectively to a short, hash-tag-safe string.

    Plain ids (printable ASCII without braces or spaces, at most 128 bytes, not
    starting with ``~``) appear as they are. Every other id becomes ``~b`` plus
    its URL-safe base64, or ``~h`` plus its SHA-256 when long. A plain id never
    starts with ``~``, so the two forms cannot collide, and neither contains a
    brace, so no id can close the hash tag and reach another user's keys.
    """
    if _is_plain(user_id):
        return user_id
    raw = user_id.encode("utf-8", "surrogatepass")
    if len(raw) <= _MAX_B64_SOURCE_BYTES:
        return "~b" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    return "~h" + hashlib.sha256(raw).hexdigest()


def decode_user_tag(tag: str, stored: bytes | str | None = None) -> str:
    """The user id behind a hash tag: the inverse of :func:`encode_user_id`.

    ``~h`` tags are hashes and cannot be decoded: the scripts keep the raw id
    of such users in the user hash (``stored``); without it the tag is shown.
    """
    if stored:
        return stored.decode("utf-8", "surrogatepass") if isinstance(stored, bytes) else stored
    if tag.startswith("~b"):
        body = tag[2:]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return raw.decode("utf-8", "surrogatepass")
        except (binascii.Error, UnicodeDecodeError):
            return tag
    return tag


class Keys:
    """Key names under one prefix (default ``tokenfirewall``)."""

    __slots__ = ("dead_letters", "events", "prefix", "usage")

    def __init__(self, prefix: str = "tokenfirewall") -> None:
        self.prefix = prefix
        self.usage = f"{prefix}:usage"
        self.events = f"{prefix}:events"
        self.dead_letters = f"{prefix}:dead"

    def usage_shard(self, shard: int, shards: int) -> str:
        """Usage stream key: one stream, or ``usage:{n}`` shards on a cluster."""
        return self.usage if shards <= 1 else f"{self.usage}:{{{shard}}}"

    def usage_shards(self, shards: int) -> list[str]:
        return [self.usage_shard(n, shards) for n in range(max(1, shards))]

    def budget(self, tag: str, period: str) -> str:
        """Tokens charged in a period: reconciled usage plus open reservations."""
        return f"{self.prefix}:budget:{{{tag}}}:{period}"

    def period(self, tag: str, period: str) -> str:
        """Period record hash: policy, bonus, reconciled usage, closed and event flags."""
        return f"{self.prefix}:period:{{{tag}}}:{period}"

    def user(self, tag: str) -> str:
        """User hash: latest period with a record, per-user limit override."""
        return f"{self.prefix}:user:{{{tag}}}"

    def reservations(self, tag: str) -> str:
        """Open reservations: id -> ``month_index:amount:expiry_ms``."""
        return f"{self.prefix}:resv:{{{tag}}}"

    def released(self, tag: str) -> str:
        """Reservations released on expiry, kept so a late settlement applies once."""
        return f"{self.prefix}:rel:{{{tag}}}"

    def applied(self, tag: str, period: str) -> str:
        """Ids of settlements applied without a reservation (fail-open buffer)."""
        return f"{self.prefix}:done:{{{tag}}}:{period}"

    def user_keys(self, tag: str, period: str) -> list[str]:
        """The keys the reserve and settle scripts take, in their KEYS order."""
        return [
            self.budget(tag, period),
            self.period(tag, period),
            self.user(tag),
            self.reservations(tag),
            self.released(tag),
            self.applied(tag, period),
        ]
