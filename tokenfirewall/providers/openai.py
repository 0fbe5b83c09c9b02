"""OpenAI: chat completions, legacy completions, embeddings, Responses API."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from tokenfirewall.providers.base import Estimate, Provider, ResponseObserver
from tokenfirewall.providers.estimating import (
    choice_count,
    completion_cap,
    default_estimate,
    reservation,
)
from tokenfirewall.providers.jsonutil import decode_json, decode_object
from tokenfirewall.providers.observers import standard_observer
from tokenfirewall.providers.sse import SSEEvent
from tokenfirewall.providers.tokens import prompt_tokens

CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = "chat", "completions", "embeddings", "responses"

# Matched as path suffixes, so prefixes such as /openai/v1 still work.
# "/chat/completions" must come before "/completions".
_PATH_KINDS = (
    ("/chat/completions", CHAT),
    ("/completions", COMPLETIONS),
    ("/embeddings", EMBEDDINGS),
    ("/responses", RESPONSES),
)
_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# A `"usage": null` member with its separating comma, before or after it.
_NULL_USAGE_PATTERN = r',[ \t]*"usage"[ \t]*:[ \t]*null|"usage"[ \t]*:[ \t]*null[ \t]*,'
_NULL_USAGE = re.compile(_NULL_USAGE_PATTERN.encode())
_NULL_USAGE_TEXT = re.compile(_NULL_USAGE_PATTERN)


def path_kind(path: str) -> str | None:
    path = path.rstrip("/")
    return next((kind for suffix, kind in _PATH_KINDS if path.endswith(suffix)), None)


def _body_kind(doc: dict[str, Any]) -> str | None:
    """The API a body belongs to, for apps that serve it at their own paths."""
    if "messages" in doc:
        return CHAT
    if "prompt" in doc:
        return COMPLETIONS
    return RESPONSES if "input" in doc else None


def _prompt_count(doc: dict[str, Any]) -> int:
    """Legacy completions take a batch of prompts, each completed n times."""
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def _request_usage(doc: dict[str, Any]) -> bytes | None:
    """The body with stream_options.include_usage set, or None if not needed.

    Without it a streamed chat or legacy completion reports no usage at all.
    """
    options = doc.get("stream_options", {})
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    try:
        return msgspec.json.encode({**doc, "stream_options": {**options, "include_usage": True}})
    except (msgspec.MsgspecError, UnicodeEncodeError, RecursionError):
        return None


def is_usage_only_chunk(event: SSEEvent, doc: object) -> bool:
    """The extra chunk that include_usage adds: no choices, only usage."""
    return (
        event.event == "message"
        and isinstance(doc, dict)
        and doc.get("choices") == []
        and isinstance(doc.get("usage"), dict)
    )


def undo_include_usage(event: SSEEvent, doc: object, raw: bytes) -> bytes:
    """What the client would have received had we not set include_usage.

    include_usage adds one usage-only chunk, which we drop, and a
    `"usage":null` member to every other chunk, which we cut out of the raw
    bytes (leaving the rest byte-for-byte) when that is provably exact.
    """
    if is_usage_only_chunk(event, doc):
        return b""
    if event.event != "message" or not isinstance(doc, dict) or doc.get("usage", 0) is not None:
        return raw
    # One match in the raw block and one in the data: the same member, since
    # a JSON string cannot hold an unescaped quote and the regex spans no line.
    if len(_NULL_USAGE.findall(raw)) != 1 or len(_NULL_USAGE_TEXT.findall(event.data)) != 1:
        return raw
    expected = {key: value for key, value in doc.items() if key != "usage"}
    if decode_json(_NULL_USAGE_TEXT.sub("", event.data)) != expected:
        return raw
    return _NULL_USAGE.sub(b"", raw)


class OpenAIProvider(Provider):
    name = "openai"

    def estimate(self, path: str, body: bytes, default_reservation: int) -> Estimate:
        doc = decode_object(body)
        declared = path_kind(path)
        kind = declared or (_body_kind(doc) if doc is not None else None)
        if doc is None or kind is None:
            return default_estimate(doc, default_reservation)
        base = default_estimate(doc, default_reservation)
        tokens = prompt_tokens(doc)
        if kind != EMBEDDINGS:  # embeddings generate no output tokens
            cap = completion_cap(doc, _CAP_FIELDS) or default_reservation
            choices = choice_count(doc, ("n", "best_of") if kind == COMPLETIONS else ("n",))
            tokens += cap * choices * _prompt_count(doc)
        # Only on the real endpoints: an app's own API may reject unknown fields.
        rewritten = None
        if base.stream and declared in (CHAT, COMPLETIONS):
            rewritten = _request_usage(doc)
        return Estimate(
            tokens=reservation(tokens),
            stream=base.stream,
            model=base.model,
            body=rewritten,
            injected_usage=rewritten is not None,
        )

    def observer(
        self, estimate: Estimate, status: int, content_type: str | None
    ) -> ResponseObserver | None:
        event_filter = undo_include_usage if estimate.injected_usage else None
        return standard_observer(content_type, event_filter)
