"""Response observers: JSON bodies and Server-Sent-Event streams."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from tokenfirewall.providers.base import ResponseObserver, Usage
from tokenfirewall.providers.jsonutil import decode_json
from tokenfirewall.providers.sse import MAX_EVENT_BYTES, SSEEvent, SSEParser
from tokenfirewall.providers.usage import find_usage, merge_usage

log = structlog.get_logger("tokenfirewall.providers")

MAX_JSON_BYTES = 8 * 1024 * 1024

# Given an event, its decoded data and its raw bytes, returns the bytes the
# client gets instead (b"" hides the event).
EventFilter = Callable[[SSEEvent, object, bytes], bytes]


class JSONObserver(ResponseObserver):
    """Buffers a JSON body (bounded) and reads its usage at the end."""

    def __init__(self, max_bytes: int = MAX_JSON_BYTES) -> None:
        self.usage: Usage | None = None
        self._max = max_bytes
        self._buf: bytearray | None = bytearray()  # None: over the bound, or closed

    def feed(self, chunk: bytes) -> bytes:
        if self._buf is not None:
            if len(self._buf) + len(chunk) > self._max:
                log.warning("json_response_too_large", limit=self._max)
                self._buf = None
            else:
                self._buf += chunk
        return chunk

    def close(self) -> bytes:
        if self._buf:
            self.usage = find_usage(decode_json(bytes(self._buf)))
        self._buf = None
        return b""


class SSEObserver(ResponseObserver):
    """Reads usage from an event stream; optionally rewrites some events.

    Without a filter every chunk is forwarded as it arrives. With one, the
    bytes of an event are held back until the event is complete, and events
    that name a usage object are forwarded as the filter says.
    """

    def __init__(self, event_filter: EventFilter | None = None) -> None:
        self.usage: Usage | None = None
        self._parser = SSEParser()
        self._filter = event_filter
        self._held = bytearray()  # bytes from stream offset _base on, not yet forwarded
        self._base = 0
        self._closed = False

    def feed(self, chunk: bytes) -> bytes:
        if self._closed:
            return chunk
        if self._filter is None:
            self._observe(self._parser.feed(chunk))
            return chunk
        self._held += chunk
        return self._release(self._parser.feed(chunk), self._parser.boundary)

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        events = self._parser.close()
        if self._filter is None:
            self._observe(events)
            return b""
        return self._release(events, self._base + len(self._held))

    def _observe(self, events: list[SSEEvent]) -> None:
        for event in events:
            self._inspect(event)

    def _inspect(self, event: SSEEvent) -> tuple[bool, object]:
        """Record the event's usage; return whether it names one, and its data."""
        # Only events naming a usage object can carry usage or be rewritten,
        # so the rest (most of a long stream) are never decoded.
        if '"usage"' not in event.data:
            return False, None
        doc = decode_json(event.data)
        self.usage = merge_usage(self.usage, find_usage(doc))
        return True, doc

    def _release(self, events: list[SSEEvent], upto: int) -> bytes:
        out = bytearray()
        for event in events:
            relevant, doc = self._inspect(event)
            # An event whose start was already released cannot be rewritten.
            if relevant and self._filter is not None and event.start >= self._base:
                out += self._take(event.start)
                out += self._filter(event, doc, self._take(event.end))
        out += self._take(upto)
        if len(self._held) > MAX_EVENT_BYTES:
            # Never hold a runaway event: forward it, it cannot be a usage chunk.
            out += self._take(self._base + len(self._held))
        return bytes(out)

    def _take(self, upto: int) -> bytes:
        """Remove and return the held bytes before stream offset `upto`."""
        count = max(0, upto - self._base)
        taken = bytes(self._held[:count])
        del self._held[:count]
        self._base += count
        return taken


def media_type(content_type: str | None) -> str:
    """`text/event-stream; charset=utf-8` -> `text/event-stream`."""
    return (content_type or "").partition(";")[0].strip().lower()


def standard_observer(
    content_type: str | None, event_filter: EventFilter | None = None
) -> ResponseObserver | None:
    """The observer for a JSON or event-stream body; None for anything else."""
    kind = media_type(content_type)
    if kind == "text/event-stream":
        return SSEObserver(event_filter)
    if kind == "application/json" or kind.endswith("+json"):
        return JSONObserver()
    return None
