"""An incremental Server-Sent-Events parser (WHATWG event-stream format).

Bytes arrive split anywhere: inside a multi-byte UTF-8 character, inside a
line, between the \\r and \\n of a CRLF. The parser only decodes complete
lines (a line terminator byte never occurs inside a UTF-8 sequence), and it
waits for the byte after a trailing \\r before deciding where the line ends.
Memory is bounded: an event or line larger than `max_event_bytes` is
dropped, not accumulated.

Each event records the stream offsets of its block (from the end of the
previous blank line to the end of its own), so an observer can cut exactly
that event out of the bytes it forwards.
"""

from __future__ import annotations

import re

import msgspec
import structlog

log = structlog.get_logger("tokenfirewall.providers")

MAX_EVENT_BYTES = 1024 * 1024

_EOL = re.compile(rb"\r\n|\r|\n")


class SSEEvent(msgspec.Struct, frozen=True):
    event: str  # the `event:` field, "message" when absent
    data: str  # `data:` lines joined by "\n"
    start: int  # stream offset of the first byte of the event's block
    end: int  # stream offset just past its terminating blank line


class SSEParser:
    """Feed bytes, get complete events back."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # the current, incomplete line
        self._offset = 0  # stream offset of _buf[0]
        self._block_start = 0  # stream offset where the current block began
        self._first_line = True
        self._scanned = 0  # _buf[:_scanned] holds no line terminator
        self._skipping_line = False  # the rest of an oversize line is dropped
        self._event = ""
        self._data: list[str] = []
        self._size = 0  # bytes of data in the current event
        self._oversize = False

    @property
    def boundary(self) -> int:
        """Stream offset up to which every event block is complete."""
        return self._block_start

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        pos = 0
        # Rescanning a long unterminated line on every chunk would be quadratic.
        search = self._scanned
        while (match := _EOL.search(self._buf, search)) is not None:
            # A final \r may be the first half of \r\n: wait for the next byte.
            if match.group() == b"\r" and match.end() == len(self._buf):
                break
            self._line(bytes(self._buf[pos : match.start()]), self._offset + match.end(), events)
            pos = search = match.end()
        del self._buf[:pos]
        self._offset += pos
        self._bound_line()
        self._scanned = len(self._buf) - (1 if self._buf.endswith(b"\r") else 0)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: the last line and event, even if unterminated.

        The standard discards an unterminated event; we keep it because an
        upstream that omits the final blank line still reported usage.
        """
        events: list[SSEEvent] = []
        end = self._offset + len(self._buf)
        if self._buf:
            self._line(bytes(self._buf.removesuffix(b"\r")), end, events)
            self._buf.clear()
            self._offset = end
            self._scanned = 0
        self._line(b"", end, events)
        return events

    def _bound_line(self) -> None:
        if len(self._buf) <= self._max:
            return
        # Keep a trailing \r: it may still end the line we are dropping.
        keep = 1 if self._buf.endswith(b"\r") else 0
        dropped = len(self._buf) - keep
        del self._buf[:dropped]
        self._offset += dropped
        self._skipping_line = True
        self._oversize = True

    def _line(self, raw: bytes, end: int, events: list[SSEEvent]) -> None:
        if self._skipping_line:
            self._skipping_line = False
            return
        line = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            self._dispatch(end, events)
        elif not line.startswith(":"):  # a leading colon marks a comment
            field, _, value = line.partition(":")
            self._field(field, value.removeprefix(" "))

    def _field(self, field: str, value: str) -> None:
        if field == "event":
            self._event = value
        elif field == "data":
            self._size += len(value) + 1
            if self._size > self._max:
                self._oversize = True
                self._data.clear()
            elif not self._oversize:
                self._data.append(value)
        # `id` and `retry` matter to reconnecting clients, not to us.

    def _dispatch(self, end: int, events: list[SSEEvent]) -> None:
        if self._oversize:
            log.warning("sse_event_dropped", reason="oversize", limit=self._max)
        elif self._data:
            events.append(
                SSEEvent(self._event or "message", "\n".join(self._data), self._block_start, end)
            )
        self._block_start = end
        self._event = ""
        self._data = []
        self._size = 0
        self._oversize = False
