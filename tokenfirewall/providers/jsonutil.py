"""Decoding untrusted JSON without ever raising."""

from __future__ import annotations

from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()


def decode_json(data: bytes | str) -> object | None:
    """The decoded document, or None if `data` is not valid JSON."""
    try:
        doc: object = _decoder.decode(data)
    # msgspec raises RecursionError, not a DecodeError, on deep nesting.
    except (msgspec.MsgspecError, RecursionError):
        return None
    return doc


def decode_object(data: bytes | str) -> dict[str, Any] | None:
    """The decoded top-level JSON object, or None for anything else."""
    doc = decode_json(data)
    return doc if isinstance(doc, dict) else None


def child(obj: object, key: str) -> object:
    """obj[key] if obj is a JSON object, else None."""
    return obj.get(key) if isinstance(obj, dict) else None
