"""Worker settings: one frozen dataclass, validated once at start-up."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import tzinfo

from tokenfirewall.errors import ConfigurationError

__all__ = ["WorkerConfig"]


def _default_consumer() -> str:
    # Stable across restarts on one host: a restarted worker finds its own
    # pending entries at once instead of waiting for the claim idle time.
    return socket.gethostname() or "worker"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    prefix: str = "tokenfirewall"
    group: str = "tokenfirewall-worker"
    consumer: str = field(default_factory=_default_consumer)
    shards: int = 1
    cluster: bool = False
    batch_size: int = 10_000
    block_ms: int = 2000
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    grace_seconds: float = 3600.0
    thresholds: tuple[int, ...] = (80, 90)
    sweep_interval: float = 30.0
    trim_interval: float = 10.0
    retention_days: float = 400.0
    events_maxlen: int = 1_000_000
    dead_maxlen: int = 100_000
    redis_timeout: float = 5.0
    shutdown_timeout: float = 8.0
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    timezone: tzinfo | None = None
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_timeout: float = 5.0
    webhook_max_attempts: int = 8
    webhook_queue: int = 10_000

    def __post_init__(self) -> None:
        positive = {
            "shards": self.shards,
            "batch_size": self.batch_size,
            "block_ms": self.block_ms,
            "claim_idle_ms": self.claim_idle_ms,
            "max_deliveries": self.max_deliveries,
            "sweep_interval": self.sweep_interval,
            "trim_interval": self.trim_interval,
            "redis_timeout": self.redis_timeout,
            "shutdown_timeout": self.shutdown_timeout,
            "events_maxlen": self.events_maxlen,
            "dead_maxlen": self.dead_maxlen,
            "webhook_max_attempts": self.webhook_max_attempts,
            "webhook_queue": self.webhook_queue,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigurationError(f"{name} must be positive, got {value}")
        if self.grace_seconds < 0 or self.retention_days < 0:
            raise ConfigurationError("grace and retention must not be negative")
        if any(not 0 < p <= 100 for p in self.thresholds):
            raise ConfigurationError("threshold percentages must be between 1 and 100")
        if not self.consumer or not self.group:
            raise ConfigurationError("group and consumer names must not be empty")
        if self.webhook_urls and not self.webhook_secret:
            raise ConfigurationError("webhooks need a shared secret (--webhook-secret)")

    @property
    def retention_seconds(self) -> int:
        return int(self.retention_days * 86400)
