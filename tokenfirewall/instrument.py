"""Charge the LLM calls an app makes itself to the metered request they serve.

Most apps do not return provider-shaped responses: their handler calls the
provider through an SDK and renders something of its own. Wrap the SDK's
`httpx` or `httpx2` client (the `openai` and `anthropic` SDKs use `httpx2`)
and every provider response it receives inside a metered request is read for
usage, which is charged to that request's user::

    client = openai.AsyncOpenAI(http_client=instrument_httpx(httpx2.AsyncClient()))

Usage is counted while the app consumes a streamed response, and whatever
was seen is counted when the stream closes, even if it was not read to the
end. Outside a metered request the wrapper only forwards.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import structlog

from tokenfirewall.context import Meter, current_meter
from tokenfirewall.providers import Estimate, Provider, ResponseObserver, get_provider

__all__ = ["AsyncTokenFirewallTransport", "TokenFirewallTransport", "instrument_httpx"]

log = structlog.get_logger("tokenfirewall")

ClientT = TypeVar("ClientT")

_LIBRARIES = ("httpx2", "httpx")


def _bases(name: str) -> tuple[type, ...]:
    """Class `name` of each installed httpx flavour, so one wrapper fits both."""
    found: dict[type, None] = {}  # httpx2.alias_httpx() can make them one module
    for library in _LIBRARIES:
        try:
            module = importlib.import_module(library)
        except ImportError:
            continue
        found[getattr(module, name)] = None
    if not found:
        raise ImportError("tokenfirewall.instrument needs httpx or httpx2")
    return tuple(found)


class _Tap:
    """Feeds one response body to a provider observer and charges its usage
    to the meter as it grows, so a stream abandoned midway still counts."""

    __slots__ = ("_closed", "_counted", "_meter", "_observer")

    def __init__(self, meter: Meter, observer: ResponseObserver) -> None:
        self._meter = meter
        self._observer: ResponseObserver | None = observer
        self._counted: int | None = None
        self._closed = False

    def feed(self, chunk: bytes) -> bytes:
        observer = self._observer
        if observer is None:
            return chunk
        try:
            forwarded = observer.feed(chunk)
        except Exception:
            return self._fail(chunk)
        self._charge(observer)
        return forwarded

    def close(self) -> bytes:
        observer = self._observer
        if self._closed or observer is None:
            return b""
        self._closed = True
        try:
            tail = observer.close()
        except Exception:
            return self._fail(b"")
        self._charge(observer)
        return tail

    def _fail(self, chunk: bytes) -> bytes:
        # Only a custom provider's bug gets here: stop observing, keep serving.
        log.exception("instrument_observer_failed")
        self._observer = None
        return chunk

    def _charge(self, observer: ResponseObserver) -> None:
        usage = observer.usage
        if usage is None:
            return
        # Stream usage only grows (cumulative or final figures): charge the delta.
        total = usage.total
        if self._counted is None or total > self._counted:
            self._meter.add_instrumented_tokens(total - (self._counted or 0))
            self._counted = total


class _SyncTapStreamBase:
    def __init__(self, inner: Any, tap: _Tap) -> None:
        self._inner = inner
        self._tap = tap

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            forwarded = self._tap.feed(chunk)
            if forwarded:
                yield forwarded
        tail = self._tap.close()
        if tail:
            yield tail

    def close(self) -> None:
        try:
            self._tap.close()  # count what was seen, even if not read to the end
        finally:
            self._inner.close()


class _AsyncTapStreamBase:
    def __init__(self, inner: Any, tap: _Tap) -> None:
        self._inner = inner
        self._tap = tap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            forwarded = self._tap.feed(chunk)
            if forwarded:
                yield forwarded
        tail = self._tap.close()
        if tail:
            yield tail

    async def aclose(self) -> None:
        try:
            self._tap.close()
        finally:
            await self._inner.aclose()


class _TransportBase:
    def __init__(
        self, inner: Any, *, provider: str | Provider = "openai", inject_usage: bool = True
    ) -> None:
        self.inner = inner
        self.provider = get_provider(provider)
        self.inject_usage = inject_usage

    def _prepare(self, request: Any) -> tuple[Meter, Any, Estimate] | None:
        """The meter, the request to send and its estimate; None: not metered."""
        meter = current_meter()
        if meter is None:
            return None
        estimate = self.provider.estimate(request.url.path, _body(request), 1)
        if estimate.body is not None and self.inject_usage:
            return meter, _with_body(request, estimate.body), estimate
        return meter, request, Estimate(tokens=estimate.tokens, stream=estimate.stream)

    def _tap(self, meter: Meter, estimate: Estimate, response: Any) -> _Tap | None:
        content_type = response.headers.get("content-type")
        observer = self.provider.observer(estimate, response.status_code, content_type)
        if observer is None:
            return None
        if estimate.injected_usage:
            # We strip the usage chunk we asked for, so the length would lie.
            response.headers.pop("content-length", None)
        return _Tap(meter, observer)


def _observed_already_read(response: Any, tap: _Tap) -> bool:
    """Observe a body the transport already read (mock transports do that):
    the client will not iterate the stream again."""
    try:
        content = response.content
    except Exception:  # ResponseNotRead, of either library: the normal case
        return False
    tap.feed(content)
    tap.close()
    return True


def _body(request: Any) -> bytes:
    try:
        content = request.content
    except Exception:  # RequestNotRead (of either library): a streamed upload
        return b""
    return content if isinstance(content, bytes) else b""


def _with_body(request: Any, body: bytes) -> Any:
    headers = request.headers.copy()
    headers["content-length"] = str(len(body))
    return type(request)(
        request.method, request.url, headers=headers, content=body, extensions=request.extensions
    )


class _SyncTransportBase(_TransportBase):
    def handle_request(self, request: Any) -> Any:
        prepared = self._prepare(request)
        if prepared is None:
            return self.inner.handle_request(request)
        meter, request, estimate = prepared
        response = self.inner.handle_request(request)
        tap = self._tap(meter, estimate, response)
        if tap is not None and not _observed_already_read(response, tap):
            response.stream = _SyncTapStream(response.stream, tap)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> Self:
        self.inner.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.inner.__exit__(exc_type, exc_value, traceback)


class _AsyncTransportBase(_TransportBase):
    async def handle_async_request(self, request: Any) -> Any:
        prepared = self._prepare(request)
        if prepared is None:
            return await self.inner.handle_async_request(request)
        meter, request, estimate = prepared
        response = await self.inner.handle_async_request(request)
        tap = self._tap(meter, estimate, response)
        if tap is not None and not _observed_already_read(response, tap):
            response.stream = _AsyncTapStream(response.stream, tap)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc_value, traceback)


# The clients assert that transports and response streams derive from their
# own base classes, so the concrete classes derive from those of every
# installed flavour (the type checker sees both).
if TYPE_CHECKING:
    import httpx
    import httpx2

    class _SyncTapStream(_SyncTapStreamBase, httpx2.SyncByteStream, httpx.SyncByteStream):
        pass

    class _AsyncTapStream(_AsyncTapStreamBase, httpx2.AsyncByteStream, httpx.AsyncByteStream):
        pass

    class TokenFirewallTransport(_SyncTransportBase, httpx2.BaseTransport, httpx.BaseTransport):
        """Wraps a sync transport (`httpx2.HTTPTransport()`, `httpx.HTTPTransport()`)."""

    class AsyncTokenFirewallTransport(
        _AsyncTransportBase, httpx2.AsyncBaseTransport, httpx.AsyncBaseTransport
    ):
        """Wraps an async transport (`httpx2.AsyncHTTPTransport()`, ...)."""

else:

    class _SyncTapStream(_SyncTapStreamBase, *_bases("SyncByteStream")):
        pass

    class _AsyncTapStream(_AsyncTapStreamBase, *_bases("AsyncByteStream")):
        pass

    class TokenFirewallTransport(_SyncTransportBase, *_bases("BaseTransport")):
        """Wraps a sync transport (`httpx2.HTTPTransport()`, `httpx.HTTPTransport()`)."""

    class AsyncTokenFirewallTransport(_AsyncTransportBase, *_bases("AsyncBaseTransport")):
        """Wraps an async transport (`httpx2.AsyncHTTPTransport()`, ...)."""


_WRAPPERS = (TokenFirewallTransport, AsyncTokenFirewallTransport)


def instrument_httpx(
    client: ClientT, *, provider: str | Provider = "openai", inject_usage: bool = True
) -> ClientT:
    """Wrap every transport of an `httpx`/`httpx2` `Client` or `AsyncClient`
    (the default one and those mounted, e.g. for proxies), in place.

    Returns the client. Wrapping twice has no further effect. With
    `inject_usage`, streamed OpenAI chat/legacy completions are sent with
    `stream_options.include_usage` and the extra chunk is hidden from the
    caller, as the middleware does for its own clients.
    """
    if isinstance(client, _bases("AsyncClient")):
        wrapper: type[_TransportBase] = AsyncTokenFirewallTransport
    elif isinstance(client, _bases("Client")):
        wrapper = TokenFirewallTransport
    else:
        raise TypeError(f"expected an httpx or httpx2 client, got {type(client).__name__}")
    target: Any = client

    def wrap(transport: Any) -> Any:
        if transport is None or isinstance(transport, _WRAPPERS):
            return transport
        return wrapper(transport, provider=provider, inject_usage=inject_usage)

    target._transport = wrap(target._transport)
    target._mounts = {pattern: wrap(t) for pattern, t in target._mounts.items()}
    return client
