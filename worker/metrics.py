"""Prometheus metrics of one worker, in its own registry (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.applied = Counter(
            "tokenfirewall_worker_events_applied", "Usage entries applied", ["kind"], registry=r
        )
        self.duplicates = Counter(
            "tokenfirewall_worker_duplicates",
            "Settlements already applied (redelivered), skipped", registry=r,
        )
        self.dead_letters = Counter(
            "tokenfirewall_worker_dead_letters", "Entries moved to the dead-letter stream",
            ["reason"], registry=r,
        )
        self.lag_seconds = Gauge(
            "tokenfirewall_worker_lag_seconds",
            "Age of the newest entry of the last batch when it was applied", ["stream"], registry=r,
        )
        self.lag_entries = Gauge(
            "tokenfirewall_worker_lag_entries",
            "Entries not yet delivered to the group (Redis 7+)", ["stream"], registry=r,
        )
        self.pending = Gauge(
            "tokenfirewall_worker_pending", "Entries delivered but not acknowledged",
            ["stream"], registry=r,
        )
        self.reservations_expired = Counter(
            "tokenfirewall_worker_reservations_expired", "Reservations released on expiry",
            registry=r,
        )
        self.tokens_released = Counter(
            "tokenfirewall_worker_tokens_released", "Tokens given back by expired reservations",
            registry=r,
        )
        self.periods_closed = Counter(
            "tokenfirewall_worker_periods_closed", "User-periods closed", registry=r
        )
        self.periods_adjusted = Counter(
            "tokenfirewall_worker_periods_adjusted",
            "Closed user-periods whose next bonus was recomputed", registry=r,
        )
        self.budget_events = Counter(
            "tokenfirewall_worker_budget_events", "Budget events published", ["type"], registry=r
        )
        self.events_unpublished = Gauge(
            "tokenfirewall_worker_events_unpublished",
            "Budget events waiting for Redis to come back", registry=r,
        )
        self.webhooks = Counter(
            "tokenfirewall_worker_webhook_deliveries", "Webhook delivery attempts by result",
            ["result"], registry=r,
        )
        self.batch_seconds = Histogram(
            "tokenfirewall_worker_batch_seconds", "Time to apply and acknowledge one batch",
            registry=r,
        )
        self.trimmed = Counter(
            "tokenfirewall_worker_trimmed_entries", "Stream entries trimmed", ["stream"],
            registry=r,
        )
