"""The worker: consume usage shards, sweep reservations and periods, trim, serve health.

Shutdown follows stop signal -> grace -> cancellation: on a stop the readers
finish the read in flight (at most ``block_ms``) and the batch in hand, ack
it and return; whatever still runs after ``shutdown_timeout`` is cancelled
(applying a batch is shielded, so a batch is never cut in half). Entries read
but not applied by then stay pending for this consumer name and are taken up
again on restart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Self

import anyio
import structlog
from anyio.abc import TaskGroup
from redis.exceptions import RedisError

from tokenfirewall.keys import Keys
from tokenfirewall.storage.fastpath import supports_fastpath
from worker.closing import PeriodCloser
from worker.codec import Entry, Invalid, Valid, check
from worker.config import WorkerConfig
from worker.consumer import PipelinedReader, ShardConsumer, id_tuple
from worker.duty import Duty
from worker.expiry import ReservationSweeper
from worker.health import serve_health
from worker.metrics import Metrics
from worker.publisher import Publisher
from worker.reconcile import Reconciler
from worker.redisio import connect
from worker.trimming import trim_stream
from worker.webhooks import WebhookSender

__all__ = ["Worker"]

log = structlog.get_logger("tokenfirewall.worker")

# After an error the loops wait this long before trying again (Redis restarting).
_RETRY_DELAY = 1.0


@contextmanager
def _bound(**values: Any) -> Any:
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


class Worker:
    def __init__(
        self,
        client: Any,
        config: WorkerConfig | None = None,
        *,
        blocking_client: Any | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config or WorkerConfig()
        self.client = client
        self.blocking_client = blocking_client or client
        self.clock = clock or (lambda: datetime.now(UTC))
        self.metrics = metrics or Metrics()
        self.keys = Keys(self.config.prefix)
        cfg = self.config
        self.webhooks = (
            WebhookSender(cfg.webhook_urls, cfg.webhook_secret or "", self.metrics,
                          timeout=cfg.webhook_timeout, max_attempts=cfg.webhook_max_attempts,
                          queue_size=cfg.webhook_queue)
            if cfg.webhook_urls else None
        )  # fmt: skip
        self.publisher = Publisher(
            client, self.keys, self.metrics, maxlen=cfg.events_maxlen, webhooks=self.webhooks
        )
        duty = Duty(client, self.keys, cfg, self.metrics, self.publisher, self.clock)
        self.closer = PeriodCloser(duty)
        self.sweeper = ReservationSweeper(duty)
        self.reconciler = Reconciler(duty, self.closer)
        self.consumers = [
            ShardConsumer(client, self.blocking_client, stream, self.keys, cfg)
            for stream in self.keys.usage_shards(cfg.shards)
        ]
        self.metrics_port: int | None = None
        self._ready = 0
        self._caught_up: set[str] = set()
        self._backlog_drained = anyio.Event()
        self._stopping = anyio.Event()
        self._readers = len(self.consumers)
        self._readers_done = anyio.Event()
        self._task_group: TaskGroup | None = None
        # Single node: the hot loop runs on a lean pipelined connection.
        self.pipelined: PipelinedReader | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        config: WorkerConfig | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        metrics: Metrics | None = None,
    ) -> Self:
        cfg = config or WorkerConfig()
        client = connect(url, cluster=cfg.cluster, timeout=cfg.redis_timeout)
        # Blocking reads need a socket timeout longer than their BLOCK.
        blocking = connect(
            url, cluster=cfg.cluster, timeout=cfg.redis_timeout + cfg.block_ms / 1000
        )
        worker = cls(client, cfg, blocking_client=blocking, clock=clock, metrics=metrics)
        if not cfg.cluster and supports_fastpath(url):
            worker.pipelined = PipelinedReader(url, worker.keys, cfg, worker.reconciler,
                                               worker.publisher, worker.metrics)  # fmt: skip
        return worker

    @property
    def ready(self) -> bool:
        return self._ready == len(self.consumers) and not self._stopping.is_set()

    def stop(self) -> None:
        """Ask the worker to finish the batches in hand and return from :meth:`run`."""
        self._stopping.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT with ``handle_signals``)."""
        with _bound(consumer=self.config.consumer, group=self.config.group):
            log.info("worker_starting", shards=len(self.consumers), cluster=self.config.cluster)
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._shutdown_when_stopped, tg)
                if handle_signals:
                    tg.start_soon(self._watch_signals)
                if self.config.metrics_port is not None:
                    tg.start_soon(self._serve_health)
                if self.webhooks is not None:
                    tg.start_soon(self.webhooks.run)
                for consumer in self.consumers:
                    tg.start_soon(self._consume, consumer, tg)
                tg.start_soon(self._every, self.config.sweep_interval, self._sweep)
            log.info("worker_stopped")

    async def _shutdown_when_stopped(self, tg: TaskGroup) -> None:
        await self._stopping.wait()
        with anyio.move_on_after(self.config.shutdown_timeout):
            await self._readers_done.wait()
        tg.cancel_scope.cancel()

    @property
    def _claim_interval(self) -> float:
        return max(0.1, self.config.claim_idle_ms / 2000)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("worker_stopping", signal=signal.Signals(signum).name)
                self.stop()
                return

    async def _serve_health(self) -> None:
        def listening(port: int) -> None:
            self.metrics_port = port
            log.info("metrics_listening", port=port)

        await serve_health(
            self.config.metrics_host, self.config.metrics_port or 0, self.metrics.registry,
            lambda: self.ready, listening,
        )  # fmt: skip

    # -- consumption --------------------------------------------------------

    async def _consume(self, consumer: ShardConsumer, tg: TaskGroup) -> None:
        with _bound(stream=consumer.stream):
            try:
                await self._retrying(self._prepare, consumer)
                if self._stopping.is_set():
                    return
                # Claiming starts after our own pending entries are settled:
                # both at once would deliver the same entry twice.
                tg.start_soon(self._every, self._claim_interval, self._reclaim, consumer)
                tg.start_soon(self._every, self.config.trim_interval, self._trim, consumer)
                self._ready += 1
                try:
                    await self._retrying(self._read_loop, consumer)
                finally:
                    self._ready -= 1
            finally:
                self._readers -= 1
                if self._readers == 0:
                    self._readers_done.set()

    async def _prepare(self, consumer: ShardConsumer) -> None:
        await consumer.ensure_group()
        # Whatever this consumer name held when it died comes first.
        while entries := await consumer.own_pending():
            await self._handle(consumer, entries)

    async def _read_loop(self, consumer: ShardConsumer) -> None:
        if self.pipelined is not None:
            caught_up = lambda: self._mark_caught_up(consumer)  # noqa: E731
            await self.pipelined.run(consumer, self._stopping.is_set, caught_up)
            return
        while not self._stopping.is_set():
            entries = await consumer.read(block=True)
            # A full batch means more is waiting: drain without blocking.
            while entries:
                await self._handle(consumer, entries)
                if len(entries) < self.config.batch_size or self._stopping.is_set():
                    break
                entries = await consumer.read(block=False)
            self._mark_caught_up(consumer)

    def _mark_caught_up(self, consumer: ShardConsumer) -> None:
        # Periods close only once the backlog present at start-up is applied,
        # so a worker starting after an outage does not close a month first and
        # then adjust it with every settlement it had not read yet.
        self._caught_up.add(consumer.stream)
        if len(self._caught_up) == len(self.consumers):
            self._backlog_drained.set()

    async def _reclaim(self, consumer: ShardConsumer) -> None:
        with _bound(stream=consumer.stream, task="reclaim"):
            while entries := await consumer.claim():
                await self._handle(consumer, entries)

    async def _handle(self, consumer: ShardConsumer, entries: list[Entry]) -> None:
        """Apply and acknowledge one batch; a stop waits for it (shielded, bounded)."""
        with anyio.CancelScope(shield=True), anyio.fail_after(self.config.shutdown_timeout):
            started = time.perf_counter()
            await self._apply(consumer, entries)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _apply(self, consumer: ShardConsumer, entries: list[Entry]) -> None:
        dead: list[Invalid] = []
        valid: list[Valid] = []
        for entry in entries:
            if entry.fields is None:
                continue  # trimmed while pending: nothing left to apply
            if entry.deliveries > self.config.max_deliveries:
                dead.append(Invalid(entry, f"too many deliveries ({entry.deliveries})"))
                continue
            checked = check(entry)
            if isinstance(checked, Invalid):
                dead.append(checked)
            else:
                valid.append(checked)
        dead += await self.reconciler.apply(valid)
        await self.publisher.flush()
        await consumer.finish([e.id for e in entries], dead)
        for item in dead:
            self.metrics.dead_letters.labels(reason=item.reason.split(":")[0].split(" (")[0]).inc()
            log.warning("dead_lettered", id=item.entry.id.decode(), reason=item.reason)
        newest_ms = id_tuple(entries[-1].id)[0]
        self.metrics.lag_seconds.labels(stream=consumer.stream).set(
            max(0.0, time.time() - newest_ms / 1000)
        )

    # -- periodic tasks -----------------------------------------------------

    async def _sweep(self) -> None:
        await self._backlog_drained.wait()
        # Shielded: an expiry or close script that ran must get its events out.
        with anyio.CancelScope(shield=True), anyio.fail_after(self.config.shutdown_timeout * 4):
            await self.sweeper.sweep()
            await self.closer.sweep()
            await self.publisher.flush()

    async def _trim(self, consumer: ShardConsumer) -> None:
        await trim_stream(self.client, consumer.stream, self.metrics)
        await trim_stream(self.client, self.keys.events, self.metrics)

    async def _every(
        self, interval: float, action: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        while True:
            try:
                await action(*args)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("periodic_task_failed", task=action.__name__, error=repr(exc))
            except Exception:
                # A housekeeping bug must not stop reconciliation: log, go on.
                log.exception("periodic_task_crashed", task=action.__name__)
            await anyio.sleep(interval)

    async def _retrying(
        self, action: Callable[[ShardConsumer], Awaitable[None]], consumer: ShardConsumer
    ) -> None:
        """Run ``action`` to completion, retrying on Redis errors (never crash-loop)."""
        while True:
            try:
                await action(consumer)
                return
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("redis_error", task=action.__name__, error=repr(exc))
                if self._stopping.is_set():
                    return
                await anyio.sleep(_RETRY_DELAY)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.shutdown_timeout):
            if self.webhooks is not None:
                await self.webhooks.aclose()
            await self.client.aclose()
            if self.blocking_client is not self.client:
                await self.blocking_client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
