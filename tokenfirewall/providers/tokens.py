"""A conservative prompt-token estimate from a request body.

Real tokenizers are model-specific and `tiktoken` downloads its tables at
run time, so we do not tokenize. We overestimate instead, because the
estimate only sizes a reservation that settlement later corrects, and an
underestimate lets a user overshoot the budget by one request:

* text: ceil(UTF-8 bytes / 3). English averages about 4 bytes per token and
  CJK about 3 bytes (one character) per token with current encodings;
* every message adds MESSAGE_OVERHEAD tokens (role and separators);
* tool and response-format definitions count as their JSON text;
* an image counts IMAGE_TOKENS (about the most a large image costs);
* another inline file (PDF, audio) counts one token per FILE_BYTES_PER_TOKEN
  of decoded size, roughly what a PDF page of text costs;
* integers count one token each (pre-tokenized prompts and inputs).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

MESSAGE_OVERHEAD = 4
REQUEST_OVERHEAD = 3  # the priming of the assistant's reply
IMAGE_TOKENS = 1_600
FILE_BYTES_PER_TOKEN = 32
BYTES_PER_TOKEN = 3

_IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
_INLINE_DATA_KEYS = frozenset({"data", "file_data"})
# Real payloads nest a handful of levels; deeper structures are not prompts.
_MAX_DEPTH = 32
# Request fields that the model reads as prompt text, across the APIs.
_TEXT_FIELDS = frozenset({"system", "instructions", "input", "prompt", "suffix"})
# Definitions the provider renders into the prompt.
_SCHEMA_FIELDS = frozenset({"tools", "functions", "response_format", "text", "tool_choice"})


def text_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "replace")) / BYTES_PER_TOKEN)


def prompt_tokens(doc: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat, completion, response or embedding request."""
    total = REQUEST_OVERHEAD
    # One pass over the request's own keys: most requests name few of the
    # fields we look for, and this runs on every request.
    for key, value in doc.items():
        if key == "messages":
            if isinstance(value, list):
                total += MESSAGE_OVERHEAD * len(value) + _walk(value, 0)
        elif key in _TEXT_FIELDS:
            total += _walk(value, 0)
        elif key in _SCHEMA_FIELDS:
            total += _json_tokens(value)
    return total


def _json_tokens(value: object) -> int:
    if value is None:
        return 0
    try:
        return math.ceil(len(msgspec.json.encode(value)) / BYTES_PER_TOKEN)
    except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError):
        return 0


def _walk(value: object, depth: int) -> int:
    """Tokens of the text in a message, content part or input item."""
    if isinstance(value, str):
        return _inline_file_tokens(value) if _is_data_url(value) else text_tokens(value)
    if isinstance(value, bool) or depth > _MAX_DEPTH:
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_walk(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return _walk_object(value, depth)
    return 0


def _walk_object(obj: dict[str, Any], depth: int) -> int:
    if obj.get("type") in _IMAGE_TYPES:
        return IMAGE_TOKENS
    # Anthropic's plain-text document source keeps its text in "data" too.
    binary = obj.get("type") != "text"
    total = 0
    for key, value in obj.items():
        if binary and key in _INLINE_DATA_KEYS and isinstance(value, str):
            total += _inline_file_tokens(value)
        else:
            total += _walk(value, depth + 1)
    return total


def _is_data_url(text: str) -> bool:
    return text.startswith("data:") and ";base64," in text[:256]


def _inline_file_tokens(encoded: str) -> int:
    """Tokens for a base64 payload or data: URL (a file, not text)."""
    decoded_bytes = len(encoded) * 3 // 4
    return max(1, math.ceil(decoded_bytes / FILE_BYTES_PER_TOKEN))
