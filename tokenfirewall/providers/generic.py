"""A provider for APIs of unknown shape: reserve the default, read `usage` if any."""

from __future__ import annotations

from tokenfirewall.providers.base import Estimate, Provider, ResponseObserver
from tokenfirewall.providers.estimating import default_estimate
from tokenfirewall.providers.jsonutil import decode_object
from tokenfirewall.providers.observers import standard_observer


class GenericProvider(Provider):
    """Reads a `usage` object with OpenAI or Anthropic field names, if the
    response (or a stream event) has one, at the top level or under
    `response` / `message`.
    """

    name = "generic"

    def estimate(self, path: str, body: bytes, default_reservation: int) -> Estimate:
        return default_estimate(decode_object(body), default_reservation)

    def observer(
        self, estimate: Estimate, status: int, content_type: str | None
    ) -> ResponseObserver | None:
        return standard_observer(content_type)
