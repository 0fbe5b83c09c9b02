"""The tokenfirewall worker daemon: reconciles usage, closes periods, publishes events."""

from worker.config import WorkerConfig
from worker.daemon import Worker

__all__ = ["Worker", "WorkerConfig"]
