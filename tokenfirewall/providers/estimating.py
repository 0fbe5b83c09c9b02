"""Helpers shared by the providers' request estimates."""

from __future__ import annotations

from typing import Any

from tokenfirewall.providers.base import MAX_USAGE_TOKENS, Estimate

# OpenAI's own ceiling for `n`; a larger value is rejected upstream anyway.
MAX_CHOICES = 128


def _count(value: object) -> int | None:
    """A positive int field of the request; anything else counts as absent."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return min(value, MAX_USAGE_TOKENS)


def completion_cap(doc: dict[str, Any], fields: tuple[str, ...]) -> int | None:
    """The largest output-token cap the request sets, if any."""
    caps = [c for c in (_count(doc.get(f)) for f in fields) if c is not None]
    return max(caps) if caps else None


def choice_count(doc: dict[str, Any], fields: tuple[str, ...] = ("n",)) -> int:
    """How many completions the request generates per prompt."""
    counts = [c for c in (_count(doc.get(f)) for f in fields) if c is not None]
    return min(max(counts, default=1), MAX_CHOICES)


def reservation(tokens: int) -> int:
    """Clamp a token figure into a valid reservation."""
    return max(1, min(tokens, MAX_USAGE_TOKENS))


def default_estimate(doc: dict[str, Any] | None, default_reservation: int) -> Estimate:
    """The estimate for a request whose shape we do not know."""
    if doc is None:
        return Estimate(tokens=reservation(default_reservation))
    model = doc.get("model")
    return Estimate(
        tokens=reservation(default_reservation),
        stream=doc.get("stream") is True,
        model=model if isinstance(model, str) else None,
    )
