"""Per-user monthly LLM token budgets with rollover, for ASGI apps."""

from tokenfirewall.config import BudgetInfo, Rollover, UserBudget
from tokenfirewall.context import record_usage
from tokenfirewall.errors import (
    ConfigurationError,
    StorageUnavailableError,
    TokenFirewallError,
)
from tokenfirewall.events import subscribe
from tokenfirewall.middleware import TokenFirewall
from tokenfirewall.request import Request
from tokenfirewall.storage import MemoryStorage, RedisStorage, Storage

__all__ = [
    "BudgetInfo",
    "ConfigurationError",
    "MemoryStorage",
    "RedisStorage",
    "Request",
    "Rollover",
    "Storage",
    "StorageUnavailableError",
    "TokenFirewall",
    "TokenFirewallError",
    "UserBudget",
    "record_usage",
    "subscribe",
]

__version__ = "0.1.0"
