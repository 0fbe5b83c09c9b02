"""What the worker's duties share: one client, key names, settings, metrics,
the event publisher and the clock, handed over as one value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tokenfirewall.keys import Keys
from worker.config import WorkerConfig
from worker.metrics import Metrics
from worker.publisher import Publisher

__all__ = ["Duty"]


@dataclass(frozen=True, slots=True)
class Duty:
    client: Any
    keys: Keys
    config: WorkerConfig
    metrics: Metrics
    publisher: Publisher
    clock: Callable[[], datetime]
