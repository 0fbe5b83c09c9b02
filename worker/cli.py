"""``tokenfirewall-worker``: flags, each with a ``TOKENFIREWALL_*`` environment default."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import structlog

from tokenfirewall.errors import ConfigurationError
from worker.config import WorkerConfig
from worker.daemon import Worker
from worker.logs import configure_logging

__all__ = ["build_parser", "main"]

ENV = "TOKENFIREWALL_"
# Test-only and undocumented in --help: pins the worker's clock to an ISO 8601
# instant so tests can close a month without waiting for one.
FAKE_NOW_ENV = "TOKENFIREWALL_FAKE_NOW"

log = structlog.get_logger("tokenfirewall.worker")


def _env(name: str, default: Any) -> Any:
    return os.environ.get(ENV + name, default)


def _flag(parser: argparse.ArgumentParser, flag: str, env: str, kind: type, default: Any,
          help_text: str) -> None:  # fmt: skip
    parser.add_argument(
        flag, type=kind, default=kind(_env(env, default)) if default is not None
        or ENV + env in os.environ else None,
        help=f"{help_text} (env {ENV}{env}; default: %(default)s)",
    )  # fmt: skip


def _percents(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.replace(" ", "").split(",") if p)


def build_parser() -> argparse.ArgumentParser:
    defaults = WorkerConfig(consumer="-")
    p = argparse.ArgumentParser(
        prog="tokenfirewall-worker",
        description="Reconcile token usage, close periods and publish budget events.",
    )
    p.add_argument("--redis-url", default=_env("REDIS_URL", "redis://localhost:6379/0"),
                   help=f"Redis URL (env {ENV}REDIS_URL; default: %(default)s)")
    p.add_argument("--cluster", action="store_true",
                   default=_env("CLUSTER", "").lower() in ("1", "true", "yes"),
                   help=f"connect with a Redis Cluster client (env {ENV}CLUSTER)")
    _flag(p, "--prefix", "PREFIX", str, defaults.prefix, "key prefix")
    _flag(p, "--group", "GROUP", str, defaults.group, "consumer group name")
    _flag(p, "--consumer", "CONSUMER", str, None, "stable consumer name (default: host name)")
    _flag(p, "--shards", "SHARDS", int, defaults.shards, "number of usage stream shards")
    _flag(p, "--batch-size", "BATCH_SIZE", int, defaults.batch_size, "entries per read")
    _flag(p, "--block-ms", "BLOCK_MS", int, defaults.block_ms, "XREADGROUP BLOCK time, ms")
    _flag(p, "--claim-idle-ms", "CLAIM_IDLE_MS", int, defaults.claim_idle_ms,
          "claim entries of consumers idle this long, ms")
    _flag(p, "--max-deliveries", "MAX_DELIVERIES", int, defaults.max_deliveries,
          "dead-letter an entry delivered more often than this")
    _flag(p, "--grace", "GRACE", float, defaults.grace_seconds,
          "seconds after a period's end before it is closed")
    _flag(p, "--thresholds", "THRESHOLDS", str, "80,90", "budget.threshold percentages")
    _flag(p, "--sweep-interval", "SWEEP_INTERVAL", float, defaults.sweep_interval,
          "seconds between reservation-expiry and period-close sweeps")
    _flag(p, "--trim-interval", "TRIM_INTERVAL", float, defaults.trim_interval,
          "seconds between stream trims")
    _flag(p, "--retention-days", "RETENTION_DAYS", float, defaults.retention_days,
          "keep closed period records this long (0: forever)")
    _flag(p, "--events-maxlen", "EVENTS_MAXLEN", int, defaults.events_maxlen,
          "approximate cap of the events stream")
    _flag(p, "--timezone", "TIMEZONE", str, "UTC", "time zone of period boundaries")
    _flag(p, "--metrics-port", "METRICS_PORT", int, None,
          "serve /metrics, /healthz, /readyz on this port")
    _flag(p, "--metrics-host", "METRICS_HOST", str, defaults.metrics_host, "metrics bind address")
    _flag(p, "--redis-timeout", "REDIS_TIMEOUT", float, defaults.redis_timeout,
          "seconds before a Redis call gives up")
    _flag(p, "--webhook-url", "WEBHOOK_URL", str, None,
          "POST budget events here (comma-separated list)")
    _flag(p, "--webhook-secret", "WEBHOOK_SECRET", str, None, "HMAC-SHA256 shared secret")
    _flag(p, "--log-level", "LOG_LEVEL", str, "info", "debug, info, warning or error")
    return p


def _timezone(name: str) -> Any:
    if name.upper() == "UTC":
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(f"unknown time zone {name!r}") from exc


def config_from(args: argparse.Namespace) -> WorkerConfig:
    options: dict[str, Any] = {
        "prefix": args.prefix, "group": args.group, "shards": args.shards,
        "cluster": args.cluster, "batch_size": args.batch_size, "block_ms": args.block_ms,
        "claim_idle_ms": args.claim_idle_ms, "max_deliveries": args.max_deliveries,
        "grace_seconds": args.grace, "thresholds": _percents(args.thresholds),
        "sweep_interval": args.sweep_interval, "trim_interval": args.trim_interval,
        "retention_days": args.retention_days, "events_maxlen": args.events_maxlen,
        "metrics_port": args.metrics_port, "metrics_host": args.metrics_host,
        "redis_timeout": args.redis_timeout, "timezone": _timezone(args.timezone),
        "webhook_urls": tuple(u for u in (args.webhook_url or "").split(",") if u),
        "webhook_secret": args.webhook_secret,
    }  # fmt: skip
    if args.consumer:
        options["consumer"] = args.consumer
    return WorkerConfig(**options)


def _clock() -> Callable[[], datetime] | None:
    pinned = os.environ.get(FAKE_NOW_ENV)
    if not pinned:
        return None
    instant = datetime.fromisoformat(pinned)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return lambda: instant


async def _run(url: str, config: WorkerConfig) -> None:
    async with Worker.from_url(url, config, clock=_clock()) as worker:
        await worker.run(handle_signals=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from(args)
    except (ConfigurationError, ValueError) as exc:
        print(f"tokenfirewall-worker: {exc}", file=sys.stderr)
        return 2
    anyio.run(_run, args.redis_url, config)
    return 0
