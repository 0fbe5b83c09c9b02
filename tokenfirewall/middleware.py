"""``TokenFirewall``: a plain ASGI middleware enforcing per-user token budgets."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any

import structlog
from redis.exceptions import RedisError

from tokenfirewall.config import BudgetInfo, Policy, UserBudget, check_amount
from tokenfirewall.context import Meter, bind, unbind
from tokenfirewall.errors import ConfigurationError, RequestTooLargeError, StorageUnavailableError
from tokenfirewall.messages import Refused
from tokenfirewall.metering import ResponseMeter
from tokenfirewall.periods import period_of, reset_at
from tokenfirewall.providers import Estimate, Provider, get_provider
from tokenfirewall.request import Request
from tokenfirewall.responses import error_response, exceeded_response
from tokenfirewall.storage.base import ReserveRequest, ReserveResult, Storage
from tokenfirewall.storage.memory import MemoryStorage
from tokenfirewall.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TokenFirewall"]

log = structlog.get_logger("tokenfirewall")

DEFAULT_MAX_BODY = 4 * 1024 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class TokenFirewall:
    """Reserve tokens before the app runs; settle what was used after it answers."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        user_budget: UserBudget,
        provider: str | Provider = "openai",
        storage: Storage | None = None,
        clock: Callable[[], datetime] | None = None,
        paths: Sequence[str] | None = None,
        exclude_paths: Sequence[str] = (),
        max_body_size: int = DEFAULT_MAX_BODY,
        default_reservation: int = 1024,
        reservation_ttl: float = 900.0,
        timezone: tzinfo | None = None,
        fail_open: bool = False,
    ) -> None:
        self.app = app
        self.budget = user_budget
        self.provider = get_provider(provider)
        self.storage = storage if storage is not None else MemoryStorage(clock=clock)
        self.clock = clock or self.storage.clock or _utcnow
        self.paths = tuple(paths) if paths is not None else None
        self.exclude_paths = tuple(exclude_paths)
        self.max_body_size = check_amount("max_body_size", max_body_size)
        self.default_reservation = check_amount("default_reservation", default_reservation)
        if reservation_ttl <= 0:
            raise ConfigurationError("reservation_ttl must be positive")
        self.reservation_ttl_ms = int(reservation_ttl * 1000)
        self.timezone = timezone
        self.fail_open = fail_open
        limit = user_budget.monthly_token_limit
        self._static_policy = (
            None if callable(limit) else Policy.resolve(limit, user_budget.rollover)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._selected(scope.get("path", "/")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        user_id = await _maybe_await(self.budget.extract_user_id(request))
        if user_id is None:
            await self._anonymous(scope, receive, send)
            return
        if not isinstance(user_id, str):
            user_id = str(user_id)
        try:
            body = await self._read_body(request, receive)
        except RequestTooLargeError:
            await error_response(413, "Request body too large")(scope, receive, send)
            return
        if body is None:
            return  # the client left before sending its body: nothing to meter
        request.body = body
        await self._metered(request, user_id, receive, send)

    def _selected(self, path: str) -> bool:
        if any(path.startswith(p) for p in self.exclude_paths):
            return False
        return self.paths is None or any(path.startswith(p) for p in self.paths)

    async def _anonymous(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.budget.anonymous == "reject":
            await error_response(401, "A user id is required")(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _read_body(self, request: Request, receive: Receive) -> bytes | None:
        """The whole body, bounded; ``None`` if the client disconnected."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_size:
            raise RequestTooLargeError(declared)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                raise RequestTooLargeError(str(size))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _policy(self, user_id: str) -> Policy:
        if self._static_policy is not None:
            return self._static_policy
        source = self.budget.monthly_token_limit
        if not callable(source):  # pragma: no cover - __init__ resolved the static case
            raise ConfigurationError("monthly_token_limit")
        limit = check_amount("monthly_token_limit", await _maybe_await(source(user_id)))
        return Policy.resolve(limit, self.budget.rollover)

    async def _metered(self, request: Request, user_id: str, receive: Receive, send: Send) -> None:
        scope = request.scope
        estimate = self.provider.estimate(
            scope.get("path", "/"), request.body, self.default_reservation
        )
        now = self.clock()
        period = period_of(now, self.timezone)
        policy = await self._policy(user_id)
        reservation_id = os.urandom(16).hex()
        now_ms = int(now.timestamp() * 1000)
        try:
            result = await self.storage.reserve(
                ReserveRequest(
                    user_id=user_id,
                    period=period,
                    estimate=estimate.tokens,
                    policy=policy,
                    reservation_id=reservation_id,
                    expires_at_ms=now_ms + self.reservation_ttl_ms,
                    now_ms=now_ms,
                )
            )
        except StorageUnavailableError:
            if not self.fail_open:
                log.warning("storage_unavailable_rejecting", user=user_id)
                await error_response(503, "Token budget service unavailable")(scope, receive, send)
                return
            log.warning("storage_unavailable_admitting", user=user_id)
            result = None
        info = self._info(user_id, period, estimate, policy, result)
        if result is not None and not result.admitted:
            await self._refuse(request, info, result, now, receive, send)
            return
        meter = Meter(
            user_id=user_id,
            reservation_id=reservation_id,
            period=period,
            reserved=estimate.tokens if result is not None else 0,
            model=estimate.model,
        )
        await self._run_app(request, meter, estimate, info, policy, receive, send)

    def _info(
        self,
        user_id: str,
        period: str,
        estimate: Estimate,
        policy: Policy,
        result: ReserveResult | None,
    ) -> BudgetInfo:
        if result is None:  # failing open: the budget is unknown, report the policy
            used, limit, monthly, bonus = 0, policy.monthly_limit, policy.monthly_limit, 0
        else:
            used, limit = result.charged, result.limit
            monthly, bonus = result.monthly_limit, result.bonus
        return BudgetInfo(
            user_id=user_id,
            period=period,
            used=used,
            limit=limit,
            monthly_limit=monthly,
            bonus=bonus,
            remaining=max(0, limit - used),
            requested=estimate.tokens,
            reset_at=reset_at(period, self.timezone),
        )

    async def _refuse(
        self,
        request: Request,
        info: BudgetInfo,
        result: ReserveResult,
        now: datetime,
        receive: Receive,
        send: Send,
    ) -> None:
        if result.first_refusal:
            refusal = Refused(
                user=info.user_id,
                period=info.period,
                requested=info.requested,
                used=info.used,
                limit=info.limit,
                at=int(now.timestamp() * 1000),
            )
            try:
                await self.storage.refused(refusal)
            except (StorageUnavailableError, RedisError) as exc:
                # Only the budget.exceeded event is at stake, never a budget.
                log.warning("refusal_not_published", user=info.user_id, error=repr(exc))
        handler = self.budget.on_budget_exceeded
        response = None
        if handler is not None:
            response = await _maybe_await(handler(request, info))
        if response is None:
            response = exceeded_response(info, now)
        await response(request.scope, receive, send)

    async def _run_app(
        self,
        request: Request,
        meter: Meter,
        estimate: Estimate,
        info: BudgetInfo,
        policy: Policy,
        receive: Receive,
        send: Send,
    ) -> None:
        response = ResponseMeter(self.provider, estimate, info, send)
        scope = request.scope
        body = request.body
        if estimate.body is not None:
            body = estimate.body
            scope = _with_content_length(scope, len(body))
        replay = _replay(body, receive, response)
        token = bind(meter)
        try:
            await self.app(scope, replay, response.send)
        except BaseException:
            response.failed()
            raise
        finally:
            unbind(token)
            self._settle(response, meter, policy)

    def _settle(self, response: ResponseMeter, meter: Meter, policy: Policy) -> None:
        # Handed over without waiting: the response is done, and a cancelled
        # request (client gone) must not be able to lose its settlement.
        self.storage.settle_soon(response.settlement(meter, policy, self.clock()))


def _with_content_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive, response: ResponseMeter) -> Receive:
    """Hand the app the body we already read, then the real channel (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message = await receive()
        if message["type"] == "http.disconnect":
            response.disconnected()
        return message

    return replay
