from tokenfirewall.storage.base import PeriodSnapshot, ReserveRequest, ReserveResult, Storage
from tokenfirewall.storage.memory import MemoryStorage
from tokenfirewall.storage.redis import RedisStorage

__all__ = [
    "MemoryStorage",
    "PeriodSnapshot",
    "RedisStorage",
    "ReserveRequest",
    "ReserveResult",
    "Storage",
]
