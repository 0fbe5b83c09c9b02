"""Reading `usage` objects from provider responses, defensively.

Upstream responses are untrusted input: a usage figure that is negative,
not an integer or absurdly large is logged and ignored (or clamped), so a
buggy or hostile upstream can neither crash the middleware nor mint credit.
"""

from __future__ import annotations

import structlog

from tokenfirewall.providers.base import MAX_USAGE_TOKENS, Usage
from tokenfirewall.providers.jsonutil import child

log = structlog.get_logger("tokenfirewall.providers")

# Anthropic bills cache writes and reads as input on top of `input_tokens`.
_ANTHROPIC_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def coerce_tokens(value: object, field: str) -> int | None:
    """A sane token count from `value`, or None if it is missing or absurd."""
    if value is None:
        return None
    # bool is an int subclass; `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        log.warning(
            "provider_usage_ignored", field=field, reason="not an integer", value=repr(value)[:64]
        )
        return None
    if value < 0:
        log.warning("provider_usage_ignored", field=field, reason="negative", value=value)
        return None
    if value > MAX_USAGE_TOKENS:
        log.warning("provider_usage_clamped", field=field, value=value, clamped_to=MAX_USAGE_TOKENS)
        return MAX_USAGE_TOKENS
    return value


def _sum_fields(usage: dict[str, object], fields: tuple[str, ...]) -> int | None:
    counts = [coerce_tokens(usage.get(f), f) for f in fields if f in usage]
    valid = [c for c in counts if c is not None]
    return min(sum(valid), MAX_USAGE_TOKENS) if valid else None


def extract_usage(obj: object) -> Usage | None:
    """Usage from a `usage` object with OpenAI or Anthropic field names.

    OpenAI chat/legacy/embeddings name the fields prompt_tokens and
    completion_tokens; the Responses API and Anthropic name them input_tokens
    and output_tokens (Anthropic adds cache fields, billed as input). None
    if no usable field is present.
    """
    if not isinstance(obj, dict):
        return None
    if "prompt_tokens" in obj:
        input_tokens = _sum_fields(obj, ("prompt_tokens",))
    else:
        input_tokens = _sum_fields(obj, ("input_tokens", *_ANTHROPIC_CACHE_FIELDS))
    if "completion_tokens" in obj:
        output_tokens = _sum_fields(obj, ("completion_tokens",))
    else:
        output_tokens = _sum_fields(obj, ("output_tokens",))
    if input_tokens is None and output_tokens is None:
        return None
    return Usage(input_tokens=input_tokens or 0, output_tokens=output_tokens or 0)


def find_usage(doc: object) -> Usage | None:
    """Usage at the top level of a document or of its `response`/`message`.

    Responses API stream events nest it in `response`, Anthropic's
    message_start in `message`; everything else has it at the top level.
    """
    found = extract_usage(child(doc, "usage"))
    if found is None:
        found = extract_usage(child(child(doc, "response"), "usage"))
    if found is None:
        found = extract_usage(child(child(doc, "message"), "usage"))
    return found


def merge_usage(known: Usage | None, new: Usage | None) -> Usage | None:
    """Combine usage seen in several stream events, field by field.

    Streams report cumulative figures (Anthropic's message_delta) or a single
    final one (OpenAI), so the largest value seen is the best one.
    """
    if known is None or new is None:
        return new if known is None else known
    return Usage(
        input_tokens=max(known.input_tokens, new.input_tokens),
        output_tokens=max(known.output_tokens, new.output_tokens),
    )
