"""The provider interface the middleware is written against.

A provider knows one LLM API's wire format: it estimates how many tokens a
request can consume (so the budget can be reserved before the call) and it
observes the response to learn how many were actually used.
"""

from __future__ import annotations

import abc

import msgspec

from tokenfirewall.errors import ConfigurationError

# Per request. A usage figure above this is a bug or an attack, never a bill.
MAX_USAGE_TOKENS = 100_000_000


class Usage(msgspec.Struct, frozen=True):
    """Tokens one request actually used, as reported by the provider."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


class Estimate(msgspec.Struct, frozen=True):
    """What to reserve for a request, and how to forward it."""

    tokens: int  # how many tokens to reserve (>= 1)
    stream: bool = False  # the request asked for a streamed response
    model: str | None = None
    # A rewritten request body to send upstream instead (None = unchanged).
    body: bytes | None = None
    # We added stream_options.include_usage, so the observer must strip the
    # usage-only chunk that this causes before the client sees it.
    injected_usage: bool = False


class ResponseObserver(abc.ABC):
    """Observes one response body as it streams; never raises on bad input."""

    usage: Usage | None = None  # best usage known so far (None = none seen)

    @abc.abstractmethod
    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes to forward to the client now.

        Normally `chunk` itself; only an observer that strips events may hold
        back an incomplete event.
        """

    @abc.abstractmethod
    def close(self) -> bytes:
        """End of body: return any held-back bytes and finalize `usage`."""


class Provider(abc.ABC):
    """One LLM API's request estimation and response usage parsing."""

    name: str

    @abc.abstractmethod
    def estimate(self, path: str, body: bytes, default_reservation: int) -> Estimate:
        """Estimate a request; malformed input gives the default reservation."""

    @abc.abstractmethod
    def observer(
        self, estimate: Estimate, status: int, content_type: str | None
    ) -> ResponseObserver | None:
        """An observer for this response body, or None if it cannot carry usage."""


def get_provider(spec: str | Provider) -> Provider:
    """Resolve the middleware's `provider=` argument to a Provider instance."""
    if isinstance(spec, Provider):
        return spec
    # Imported here because the concrete providers import this module.
    from tokenfirewall.providers.registry import PROVIDERS

    if isinstance(spec, str) and spec.strip().lower() in PROVIDERS:
        return PROVIDERS[spec.strip().lower()]()
    names = ", ".join(sorted(PROVIDERS))
    raise ConfigurationError(
        f"unknown provider {spec!r}: expected a Provider instance or one of {names}"
    )
