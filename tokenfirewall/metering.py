"""Watching one metered response go by, and turning it into a settlement."""

from __future__ import annotations

from datetime import datetime

import structlog

from tokenfirewall.config import BudgetInfo, Policy
from tokenfirewall.context import Meter
from tokenfirewall.messages import Settled
from tokenfirewall.providers import MAX_USAGE_TOKENS, Estimate, Provider, ResponseObserver
from tokenfirewall.responses import budget_headers
from tokenfirewall.types import Message, Send

__all__ = ["ResponseMeter"]

log = structlog.get_logger("tokenfirewall")


class ResponseMeter:
    """Wraps ``send``: adds the budget headers, feeds the body to the provider's
    observer chunk by chunk (forwarding each at once) and records how it ended."""

    __slots__ = (
        "_estimate",
        "_info",
        "_observer",
        "_provider",
        "_send",
        "completed",
        "disconnect",
        "error",
        "status",
    )

    def __init__(self, provider: Provider, estimate: Estimate, info: BudgetInfo, send: Send):
        self._provider = provider
        self._estimate = estimate
        self._info = info
        self._send = send
        self._observer: ResponseObserver | None = None
        self.status = 0
        self.completed = False
        self.disconnect = False
        self.error = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            message = self._start(message)
        elif kind == "http.response.body" and self._observer is not None:
            message = self._body(message)
        if kind == "http.response.body" and not message.get("more_body", False):
            self.completed = True
        try:
            await self._send(message)
        except OSError:
            self.disconnect = True
            raise

    def _start(self, message: Message) -> Message:
        self.status = int(message.get("status", 200))
        headers = list(message.get("headers", []))
        content_type = None
        for key, value in headers:
            if key.lower() == b"content-type":
                content_type = value.decode("latin-1")
        try:
            self._observer = self._provider.observer(self._estimate, self.status, content_type)
        except Exception:  # a custom provider's bug must not break the response
            log.exception("provider_observer_failed", provider=self._provider.name)
        if self._observer is not None and self._estimate.injected_usage:
            # We strip the usage chunk we asked for, so the length would lie.
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.extend(budget_headers(self._info))
        return {**message, "headers": headers}

    def _body(self, message: Message) -> Message:
        observer = self._observer
        if observer is None:  # pragma: no cover - guarded by the caller
            return message
        body = message.get("body", b"")
        try:
            chunk = observer.feed(body)
            if not message.get("more_body", False):
                chunk += observer.close()
        except Exception:
            # Only a custom provider's bug gets here; the response must go on.
            log.exception("provider_observer_failed", provider=self._provider.name)
            self._observer = None
            return message
        return {**message, "body": chunk}

    def failed(self) -> None:
        self.error = True

    def disconnected(self) -> None:
        self.disconnect = True

    @property
    def outcome(self) -> str:
        if self.completed:
            return "complete"
        return "disconnect" if self.disconnect else "error"

    def actual(self, meter: Meter) -> int:
        """Tokens to charge, by precedence: reported, instrumented, parsed, fallback.

        With no usage at all, a failed or unanswered request is charged 0
        (upstream failures usually cost nothing) and a disconnect or an answered
        request the whole reservation: we cannot tell it was free, and charging
        the reservation is the side that never lets a budget be overspent.
        """
        if meter.reported is not None:
            return meter.reported
        if meter.instrumented is not None:
            return meter.instrumented
        observer = self._observer
        if observer is not None:
            if not self.completed:
                # A disconnect or failure mid-body: count the usage seen so far.
                self._close_quietly(observer)
            if observer.usage is not None:
                return min(observer.usage.total, MAX_USAGE_TOKENS)
        if self.status >= 400 or (self.error and not self.status):
            return 0
        return self._estimate.tokens

    def _close_quietly(self, observer: ResponseObserver) -> None:
        try:
            observer.close()
        except Exception:
            log.exception("provider_observer_failed", provider=self._provider.name)

    def settlement(self, meter: Meter, policy: Policy, now: datetime) -> Settled:
        meter.settled = True  # instrumented streams closing later must not count
        return Settled(
            rid=meter.reservation_id,
            user=meter.user_id,
            period=meter.period,
            reserved=meter.reserved,
            actual=self.actual(meter),
            model=meter.model,
            status=self.status,
            outcome=self.outcome,
            at=int(now.timestamp() * 1000),
            limit=policy.monthly_limit,
            rollover=policy.rollover,
            cap=policy.max_carryover,
        )
