"""Anthropic: the Messages API (`/v1/messages`)."""

from __future__ import annotations

from tokenfirewall.providers.base import Estimate, Provider, ResponseObserver
from tokenfirewall.providers.estimating import completion_cap, default_estimate, reservation
from tokenfirewall.providers.jsonutil import decode_object
from tokenfirewall.providers.observers import standard_observer
from tokenfirewall.providers.tokens import prompt_tokens


class AnthropicProvider(Provider):
    """Usage comes from the JSON body's `usage`, or in a stream from
    `message_start` (input, including cache tokens) and `message_delta`
    (cumulative output); the observers keep the largest figure seen.
    """

    name = "anthropic"

    def estimate(self, path: str, body: bytes, default_reservation: int) -> Estimate:
        doc = decode_object(body)
        base = default_estimate(doc, default_reservation)
        is_messages = path.rstrip("/").endswith("/messages")
        if doc is None or not (is_messages or "messages" in doc):
            return base
        cap = completion_cap(doc, ("max_tokens",)) or default_reservation
        return Estimate(
            tokens=reservation(prompt_tokens(doc) + cap), stream=base.stream, model=base.model
        )

    def observer(
        self, estimate: Estimate, status: int, content_type: str | None
    ) -> ResponseObserver | None:
        return standard_observer(content_type)
