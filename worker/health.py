"""A tiny HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import SocketStream
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["serve_health"]

_READ_LIMIT = 8192
_TIMEOUT = 5.0


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _route(path: str, registry: CollectorRegistry, ready: Callable[[], bool]) -> bytes:
    if path == "/metrics":
        return _response("200 OK", generate_latest(registry), CONTENT_TYPE_LATEST)
    if path == "/healthz":
        return _response("200 OK", b"ok\n")
    if path == "/readyz":
        if ready():
            return _response("200 OK", b"ready\n")
        return _response("503 Service Unavailable", b"not ready\n")
    return _response("404 Not Found", b"not found\n")


async def serve_health(
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled. ``/healthz`` answers while the event loop runs."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(_TIMEOUT):
                request = b""
                while b"\r\n" not in request and len(request) < _READ_LIMIT:
                    try:
                        request += await stream.receive(_READ_LIMIT)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                parts = request.split(b" ", 2)
                path = parts[1].decode("latin-1").split("?")[0] if len(parts) > 1 else "/"
                try:
                    await stream.send(_route(path, registry, ready))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async with listener:
        if on_listening is not None:
            sockname = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
            on_listening(int(sockname[1]))
        await listener.serve(handle)
