"""Turning a key's hash tag back into the user id the events report."""

from __future__ import annotations

import base64
import binascii

__all__ = ["user_of"]


def user_of(tag: str, stored: bytes | str | None = None) -> str:
    """The raw user id behind ``tag`` (see :func:`tokenfirewall.keys.encode_user_id`).

    Plain ids are their own tag and ``~b`` tags are base64; ``~h`` tags are
    hashes, so the scripts keep the raw id in the user hash (``stored``).
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
