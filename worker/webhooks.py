"""Optional webhook delivery: signed JSON POSTs, retried with backoff, off the hot path.

Reconciliation only puts an event on a bounded queue (dropping, counted, when
it is full); a separate task posts it, so a slow or dead endpoint never delays
a batch. Receivers verify ``X-TokenFirewall-Signature: sha256=<hex>``, an
HMAC-SHA256 of the raw body with the shared secret.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tokenfirewall.errors import ConfigurationError
from worker.metrics import Metrics

if TYPE_CHECKING:
    import httpx

__all__ = ["SIGNATURE_HEADER", "WebhookSender", "sign"]

log = structlog.get_logger("tokenfirewall.worker")

SIGNATURE_HEADER = "X-TokenFirewall-Signature"
EVENT_HEADER = "X-TokenFirewall-Event"
_MAX_BACKOFF = 60.0


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        urls: tuple[str, ...],
        secret: str,
        metrics: Metrics,
        *,
        timeout: float = 5.0,
        max_attempts: int = 8,
        queue_size: int = 10_000,
        base_delay: float = 0.5,
    ) -> None:
        self._urls = urls
        self._secret = secret
        self._metrics = metrics
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        send, receive = anyio.create_memory_object_stream[tuple[str, str, bytes]](queue_size)
        self._send: MemoryObjectSendStream[tuple[str, str, bytes]] = send
        self._receive: MemoryObjectReceiveStream[tuple[str, str, bytes]] = receive

    def submit(self, kind: str, body: bytes) -> None:
        for url in self._urls:
            try:
                self._send.send_nowait((url, kind, body))
            except anyio.WouldBlock:
                self._metrics.webhooks.labels(result="dropped").inc()
                log.error("webhook_queue_full", url=url, type=kind)

    async def run(self, concurrency: int = 4) -> None:
        """Deliver queued events until cancelled."""
        client = _http_client(self._timeout)
        async with client, anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(self._deliver_loop, client)

    async def _deliver_loop(self, client: httpx.AsyncClient) -> None:
        async for url, kind, body in self._receive.clone():
            await self._deliver(client, url, kind, body)

    async def _deliver(self, client: httpx.AsyncClient, url: str, kind: str, body: bytes) -> None:
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, body),
            EVENT_HEADER: kind,
        }
        for attempt in range(1, self._max_attempts + 1):
            result = await self._post(client, url, body, headers)
            if result is not None:
                self._metrics.webhooks.labels(result=result).inc()
                return
            self._metrics.webhooks.labels(result="retried").inc()
            # Full jitter: many workers retrying a recovering endpoint spread out.
            delay = min(_MAX_BACKOFF, self._base_delay * 2 ** (attempt - 1))
            await anyio.sleep(random.uniform(0, delay))
        self._metrics.webhooks.labels(result="failed").inc()
        log.error("webhook_failed", url=url, type=kind, attempts=self._max_attempts)

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> str | None:
        """``delivered``/``rejected`` when done with the event, None to retry."""
        import httpx

        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("webhook_error", url=url, error=repr(exc))
            return None
        # 4xx other than 408/429 will not get better by retrying.
        if response.is_success:
            return "delivered"
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            log.error("webhook_rejected", url=url, status=response.status_code)
            return "rejected"
        return None

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def _http_client(timeout: float) -> Any:
    try:
        import httpx
    except ImportError as exc:  # only needed when webhooks are configured
        raise ConfigurationError(
            "webhooks need httpx: pip install 'tokenfirewall[webhooks]'"
        ) from exc
    return httpx.AsyncClient(timeout=timeout)
