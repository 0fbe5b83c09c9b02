"""What the ``tokenfirewall`` admin command does to Redis (the CLI is in ``admin.py``).

Every write goes through one Lua script per user, so an operator's change and
the middleware's pre-checks never interleave half-way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from tokenfirewall.config import Policy
from tokenfirewall.connection import connect as connect_url
from tokenfirewall.errors import TokenFirewallError
from tokenfirewall.keys import Keys, decode_user_tag, encode_user_id
from tokenfirewall.messages import FIELD, decode_event
from tokenfirewall.periods import month_index, period_of, reset_at
from tokenfirewall.storage.scripts import Script, load_script

__all__ = [
    "Admin",
    "AdminError",
    "EventEntry",
    "GrantResult",
    "LimitChange",
    "ReportRow",
    "Status",
    "connect",
    "current_period",
]

_SCAN_BATCH = 500


class AdminError(TokenFirewallError):
    """A request the operator must fix (its message is shown as it is)."""


def connect(url: str, *, cluster: bool, timeout: float) -> Any:
    """A client whose every call gives up after ``timeout``: no retries, no backoff."""
    if cluster:
        return connect_url(url, cluster=True, timeout=timeout)
    # One try only: an operator wants "unreachable" within the timeout, not
    # after a retry schedule.
    return connect_url(url, timeout=timeout, retry=Retry(NoBackoff(), 0))


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


@dataclass(frozen=True, slots=True)
class Status:
    user: str
    period: str
    exists: bool
    used: int
    charged: int
    monthly_limit: int
    bonus: int
    bonus_final: bool
    granted: int
    limit: int
    remaining: int
    reset_at: str
    override: int | None
    closed: bool
    open_reservations: int


@dataclass(frozen=True, slots=True)
class LimitChange:
    user: str
    period: str
    override: int | None
    previous_override: int | None
    period_limit: int | None  # the current record's limit after the change, if any


@dataclass(frozen=True, slots=True)
class GrantResult:
    user: str
    period: str
    granted: int
    monthly_limit: int
    bonus: int


@dataclass(frozen=True, slots=True)
class ReportRow:
    user: str
    charged: int
    used: int
    limit: int
    remaining: int
    closed: bool


@dataclass(frozen=True, slots=True)
class EventEntry:
    id: str
    event: dict[str, Any] | None  # None: undecodable (``raw`` holds it)
    raw: str | None = None


def _iso(period: str) -> str:
    return reset_at(period).isoformat().replace("+00:00", "Z")


class Admin:
    def __init__(self, client: Any, prefix: str = "tokenfirewall") -> None:
        self.client = client
        self.keys = Keys(prefix)

    async def ping(self) -> None:
        await self.client.ping()

    async def _script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(script.source, len(keys), *keys, *args)

    async def status(self, user: str, period: str) -> Status:
        month_index(period)  # validates
        tag = encode_user_id(user)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.budget(tag, period))
        pipe.hmget(self.keys.period(tag, period), "l", "b", "g", "u", "f", "x")
        pipe.hget(self.keys.user(tag), "o")
        pipe.hvals(self.keys.reservations(tag))
        charged, record, override, reservations = await pipe.execute()
        limit, bonus, granted, used, final, closed = record
        effective = _int(limit) + _int(bonus) + _int(granted)
        prefix = f"{month_index(period)}:".encode()
        return Status(
            user=user,
            period=period,
            exists=limit is not None,
            used=_int(used),
            charged=_int(charged),
            monthly_limit=_int(limit),
            bonus=_int(bonus),
            bonus_final=final == b"1",
            granted=_int(granted),
            limit=effective,
            remaining=max(0, effective - _int(charged)),
            reset_at=_iso(period),
            override=None if override is None else int(override),
            closed=closed == b"1",
            open_reservations=sum(1 for r in reservations if r.startswith(prefix)),
        )

    async def set_limit(self, user: str, limit: int | None, period: str) -> LimitChange:
        month_index(period)
        tag = encode_user_id(user)
        in_record, previous = await self._script(
            load_script("set_limit"),
            [self.keys.user(tag), self.keys.period(tag, period)],
            (self.keys.prefix, tag, "" if limit is None else limit),
        )
        return LimitChange(
            user=user,
            period=period,
            override=limit,
            previous_override=None if int(previous) < 0 else int(previous),
            period_limit=None if int(in_record) < 0 else int(in_record),
        )

    async def grant(
        self, user: str, tokens: int, period: str, policy: Policy | None
    ) -> GrantResult:
        idx = month_index(period)
        tag = encode_user_id(user)
        create: tuple[Any, ...] = ("", 0, 0)
        if policy is not None:
            create = (policy.monthly_limit, int(policy.rollover), policy.max_carryover)
        reply = await self._script(
            load_script("grant"),
            [self.keys.period(tag, period), self.keys.user(tag)],
            (self.keys.prefix, tag, idx, tokens, *create),
        )
        if int(reply[0]) == 0:
            raise AdminError(
                f"user {user!r} has no record for {period}: "
                "pass --limit N (the app's monthly limit) to create it"
            )
        if int(reply[0]) < 0:
            raise AdminError(f"{period} is closed for user {user!r}: grant to an open period")
        return GrantResult(
            user=user,
            period=period,
            granted=int(reply[1]),
            monthly_limit=int(reply[2]),
            bonus=int(reply[3]),
        )

    async def period_tags(self, period: str) -> AsyncIterator[str]:
        """Tags of every user with a record in ``period`` (every master on a cluster)."""
        month_index(period)
        pattern = f"{_glob_escape(self.keys.prefix)}:period:{{*}}:{period}"
        async for key in self.client.scan_iter(match=pattern, count=1000):
            tag = _tag_of(key)
            if tag is not None:
                yield tag

    async def report(self, period: str, top: int | None) -> list[ReportRow]:
        tags = [tag async for tag in self.period_tags(period)]
        rows: list[ReportRow] = []
        for start in range(0, len(tags), _SCAN_BATCH):
            rows.extend(await self._rows(tags[start : start + _SCAN_BATCH], period))
        rows.sort(key=lambda row: (-row.charged, -row.used, row.user))
        return rows if top is None else rows[:top]

    async def _rows(self, tags: list[str], period: str) -> list[ReportRow]:
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            pipe.get(self.keys.budget(tag, period))
            pipe.hmget(self.keys.period(tag, period), "l", "b", "g", "u", "x")
            pipe.hget(self.keys.user(tag), "id")
        replies = await pipe.execute()
        rows = []
        for i, tag in enumerate(tags):
            charged, record, stored = replies[3 * i : 3 * i + 3]
            limit = _int(record[0]) + _int(record[1]) + _int(record[2])
            rows.append(
                ReportRow(
                    user=decode_user_tag(tag, stored),
                    charged=_int(charged),
                    used=_int(record[3]),
                    limit=limit,
                    remaining=max(0, limit - _int(charged)),
                    closed=record[4] == b"1",
                )
            )
        return rows

    async def tail(self, count: int) -> list[EventEntry]:
        """The last ``count`` budget events, oldest first."""
        entries = await self.client.xrevrange(self.keys.events, count=count)
        return [_entry(entry_id, fields) for entry_id, fields in reversed(entries)]

    async def follow(self, after: str, block_ms: int) -> list[EventEntry]:
        """Events newer than ``after``, waiting up to ``block_ms`` for the first."""
        reply = await self.client.xread({self.keys.events: after}, block=block_ms, count=1000)
        return [_entry(i, f) for _, entries in reply or [] for i, f in entries]

    async def last_event_id(self) -> str:
        entries = await self.client.xrevrange(self.keys.events, count=1)
        return str(entries[0][0].decode()) if entries else "0-0"

    async def close_period(self, period: str, retention_days: float) -> tuple[int, int]:
        """Close every user record of ``period`` the way the worker does.

        Returns (records found, records closed now); already closed ones are
        skipped by the script, and period.closed is published once for each.
        """
        # The worker owns closing (script, events, metrics); reuse it rather
        # than keep a second copy of the rules in step.
        from worker.closing import PeriodCloser
        from worker.config import WorkerConfig
        from worker.duty import Duty
        from worker.metrics import Metrics
        from worker.publisher import Publisher

        idx = month_index(period)
        config = WorkerConfig(prefix=self.keys.prefix, retention_days=retention_days)
        metrics = Metrics()
        publisher = Publisher(self.client, self.keys, metrics, maxlen=config.events_maxlen)
        closer = PeriodCloser(Duty(self.client, self.keys, config, metrics, publisher, _utcnow))
        pairs = [(tag, idx) async for tag in self.period_tags(period)]
        closed = await closer.close(pairs)
        if publisher.unsent:
            raise AdminError(f"{publisher.unsent} period.closed events could not be published")
        return len(pairs), closed

    async def aclose(self) -> None:
        await self.client.aclose()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> EventEntry:
    raw = fields.get(FIELD, b"")
    try:
        event = msgspec.to_builtins(decode_event(raw))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return EventEntry(entry_id.decode(), None, raw.decode("utf-8", "replace"))
    return EventEntry(entry_id.decode(), event)


def _glob_escape(text: str) -> str:
    """Escape SCAN MATCH metacharacters so a prefix matches only itself."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _tag_of(key: bytes) -> str | None:
    start, end = key.find(b"{"), key.find(b"}")
    if start < 0 or end < start:
        return None
    return key[start + 1 : end].decode("utf-8", "surrogateescape")


def current_period() -> str:
    return period_of(_utcnow())
