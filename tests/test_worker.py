"""The worker daemon against real Redis: real processes, SIGKILLs, SIGTERM, month ends."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import redis
from structlog.testing import capture_logs

from tests.support.processes import WorkerProcess
from tokenfirewall.config import Policy
from tokenfirewall.events import subscribe
from tokenfirewall.keys import Keys, encode_user_id
from tokenfirewall.messages import (
    BudgetExceeded,
    BudgetThreshold,
    PeriodAdjusted,
    PeriodClosed,
    Settled,
    decode_event,
)
from tokenfirewall.periods import period_of
from tokenfirewall.storage.base import ReserveRequest
from tokenfirewall.storage.redis import RedisStorage
from worker import Worker, WorkerConfig
from worker.duty import Duty

GROUP = "tokenfirewall-worker"
KEYS = Keys()
POLL_TIMEOUT = 30.0


# -- helpers ----------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(url: str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        process = WorkerProcess(url, tmp_path, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def pending(client: redis.Redis, stream: str = KEYS.usage) -> int:
    return int(client.xpending(stream, GROUP)["pending"])


def drained(client: redis.Redis, total: int, stream: str = KEYS.usage) -> bool:
    """Every entry of the stream delivered to the group and acknowledged."""
    try:
        groups = {g["name"]: g for g in client.xinfo_groups(stream)}
    except redis.ResponseError:
        return False
    group = groups.get(GROUP.encode())
    return group is not None and group["entries-read"] == total and group["pending"] == 0


def events(client: redis.Redis) -> list[object]:
    return [decode_event(fields[b"m"]) for _, fields in client.xrange(KEYS.events)]


def policy(limit: int = 1_000_000, rollover: bool = False, cap: int = 0) -> Policy:
    return Policy(monthly_limit=limit, rollover=rollover, max_carryover=cap)


async def reserve(storage: RedisStorage, user: str, period: str, amount: int, rid: str,
                  pol: Policy, expires_ms: int | None = None) -> bool:  # fmt: skip
    now_ms = int(time.time() * 1000)
    result = await storage.reserve(ReserveRequest(
        user_id=user, period=period, estimate=amount, policy=pol, reservation_id=rid,
        expires_at_ms=expires_ms or now_ms + 3_600_000, now_ms=now_ms,
    ))  # fmt: skip
    return result.admitted


def settled(
    user: str, period: str, rid: str, reserved: int, actual: int, pol: Policy
) -> Settled:
    return Settled(rid=rid, user=user, period=period, reserved=reserved, actual=actual,
                   limit=pol.monthly_limit, rollover=pol.rollover, cap=pol.max_carryover)


# -- exactly once ---------------------------------------------------------------


async def test_every_counter_exact_while_worker_is_sigkilled_and_restarted(
    redis_url: str, workers: Callable[..., WorkerProcess]
) -> None:
    rng = random.Random(7)
    users = [f"user-{n}" for n in range(25)] + ["ünïcode user", "x" * 200]
    period, pol = "2026-03", policy()
    truth = {u: 0 for u in users}
    total = 0
    async with RedisStorage.from_url(redis_url) as storage:
        for n in range(3000):
            user = rng.choice(users)
            rid, reserved, actual = f"r{n}", rng.randint(1, 500), rng.randint(0, 700)
            if n % 10 == 0:  # failed open: no reservation, applied once by id
                reserved = 0
            elif not await reserve(storage, user, period, reserved, rid, pol):
                pytest.fail("reservation refused")
            await storage.settle(settled(user, period, rid, reserved, actual, pol))
            truth[user] += actual
            total += 1
        client = sync_client(redis_url)
        for _ in range(6):
            process = workers(redis_url, "--batch-size", "20", "--claim-idle-ms", "200")
            before = _entries_read(client)
            await eventually(lambda b=before: _entries_read(client) > b + rng.randint(20, 200),
                             "some progress")  # fmt: skip
            process.kill()  # at an arbitrary instant, mid-batch or not
        workers(redis_url, "--batch-size", "200", "--claim-idle-ms", "200")
        await eventually(lambda: drained(client, total), "the stream to be drained")
        for user, used in truth.items():
            snap = await storage.snapshot(user, period)
            assert snap is not None, user
            assert (snap.used, snap.charged, snap.open_reservations) == (used, used, 0), user


def _entries_read(client: redis.Redis) -> int:
    try:
        groups = client.xinfo_groups(KEYS.usage)
    except redis.ResponseError:
        return 0
    return int(groups[0]["entries-read"] or 0) if groups else 0


async def test_settlement_published_while_no_worker_runs_is_applied_when_one_starts(
    redis_url: str, workers: Callable[..., WorkerProcess]
) -> None:
    pol = policy(limit=1000)
    async with RedisStorage.from_url(redis_url) as storage:
        assert await reserve(storage, "bob", "2026-03", 300, "r1", pol)
        await storage.settle(settled("bob", "2026-03", "r1", 300, 120, pol))
        client = sync_client(redis_url)
        assert not client.exists(KEYS.budget("bob", "2026-03")) or \
            int(client.get(KEYS.budget("bob", "2026-03")) or 0) == 300  # fmt: skip
        workers(redis_url)
        await eventually(lambda: drained(client, 1), "the settlement to be applied")
        snap = await storage.snapshot("bob", "2026-03")
        assert snap is not None
        assert (snap.used, snap.charged) == (120, 120)


# -- bad entries ------------------------------------------------------------------


async def test_poison_entries_are_dead_lettered_and_the_worker_goes_on(
    redis_url: str, workers: Callable[..., WorkerProcess]
) -> None:
    client = sync_client(redis_url)
    pol = policy(limit=1000)
    good = settled("carol", "2026-03", "g1", 0, 40, pol)
    client.xgroup_create(KEYS.usage, GROUP, id="0", mkstream=True)
    # Delivered to a consumer that died, already too often.
    tired = client.xadd(KEYS.usage, {"m": _encode(good, rid="t1")})
    client.xreadgroup(GROUP, "ghost", {KEYS.usage: ">"})
    client.xclaim(KEYS.usage, GROUP, "ghost", 0, [tired], retrycount=9)
    client.xadd(KEYS.usage, {"m": b"{not json"})
    client.xadd(KEYS.usage, {"other": b"x"})
    client.xadd(KEYS.usage, {"m": _encode(good, rid="neg", actual=-5)})
    client.xadd(KEYS.usage, {"m": _encode(good)})
    workers(redis_url, "--claim-idle-ms", "100", "--max-deliveries", "3")
    await eventually(lambda: client.xlen(KEYS.dead_letters) == 4, "four dead letters")
    await eventually(lambda: pending(client) == 0, "everything acknowledged")
    reasons = sorted(f[b"reason"].decode() for _, f in client.xrange(KEYS.dead_letters))
    assert [r.split(":")[0].split(" (")[0] for r in reasons] == [
        "invalid", "too many deliveries", "undecodable", "undecodable",
    ]  # fmt: skip
    assert client.hget(KEYS.period("carol", "2026-03"), "u") == b"40"  # the good one applied


def _fields(message: Settled) -> dict[str, object]:
    return {f: getattr(message, f) for f in message.__struct_fields__}


def _encode(message: Settled, **changes: object) -> bytes:
    import json

    fields = {"type": "settled", **_fields(message), **changes}
    return json.dumps(fields).encode()


# -- reservations of dead app processes ----------------------------------------------


async def test_reservation_of_a_killed_app_is_released_after_expiry(
    redis_url: str, workers: Callable[..., WorkerProcess]
) -> None:
    pol = policy(limit=1000)
    client = sync_client(redis_url)
    async with RedisStorage.from_url(redis_url) as storage:
        expires = int(time.time() * 1000) + 300
        assert await reserve(storage, "dave", "2026-03", 400, "lost", pol, expires_ms=expires)
        assert await reserve(storage, "dave", "2026-03", 100, "live", pol)
        workers(redis_url)
        budget = KEYS.budget("dave", "2026-03")
        await eventually(lambda: client.get(budget) == b"100", "the expired reservation released")
        assert client.hexists(KEYS.released("dave"), "lost")
        # The app was only slow: its settlement still applies, once.
        late = settled("dave", "2026-03", "lost", 400, 250, pol)
        await storage.settle(late)
        await storage.settle(late)
        await eventually(lambda: drained(client, 2), "the late settlement")
        snap = await storage.snapshot("dave", "2026-03")
        assert snap is not None
        assert (snap.used, snap.charged, snap.open_reservations) == (250, 350, 1)


# -- graceful shutdown ---------------------------------------------------------------


async def test_sigterm_exits_zero_within_ten_seconds_and_loses_nothing(
    redis_url: str, workers: Callable[..., WorkerProcess]
) -> None:
    pol = policy()
    total = 4000
    client = sync_client(redis_url)
    pipe = client.pipeline(transaction=False)
    for n in range(total):
        pipe.xadd(KEYS.usage, {"m": _encode(settled("erin", "2026-03", f"s{n}", 0, 3, pol))})
    pipe.execute()
    process = workers(redis_url, "--batch-size", "50", "--metrics-port", "0")
    await eventually(lambda: _entries_read(client) > 100, "some progress")
    started = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    code = await anyio.to_thread.run_sync(process.proc.wait, 15)
    assert code == 0, process.output()
    assert time.monotonic() - started < 10
    assert pending(client) == 0  # the batch in hand was finished and acknowledged
    assert '"event": "worker_stopped"' in process.output()
    workers(redis_url)
    await eventually(lambda: drained(client, total), "the rest to be applied")
    assert client.hget(KEYS.period("erin", "2026-03"), "u") == str(3 * total).encode()


# -- month close ------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_month_close_final_bonus_late_adjustment_and_events_once(redis_url: str) -> None:
    pol = policy(limit=1000, rollover=True, cap=600)
    clock = Clock(datetime(2026, 1, 20, tzinfo=UTC))
    config = WorkerConfig(consumer="c", block_ms=50, sweep_interval=0.05, grace_seconds=3600,
                          claim_idle_ms=100)  # fmt: skip
    client = sync_client(redis_url)
    worker = Worker.from_url(redis_url, config, clock=clock)
    storage = RedisStorage.from_url(redis_url, clock=clock)
    subscription = subscribe(redis_url, group="test", consumer="s")
    async with storage, worker, subscription, anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        # January: 700 used, and a reservation still open at the month's end.
        assert await reserve(storage, "fay", "2026-01", 800, "a", pol)
        await storage.settle(settled("fay", "2026-01", "a", 800, 700, pol))
        assert await reserve(storage, "fay", "2026-01", 200, "open", pol)
        await eventually(lambda: client.hget(KEYS.period("fay", "2026-01"), "u") == b"700",
                         "january's usage")  # fmt: skip
        # February opens before January is closed: provisional bonus from
        # charged tokens (700 + 200 open): 100.
        clock.now = datetime(2026, 2, 1, 0, 30, tzinfo=UTC)
        assert await reserve(storage, "fay", "2026-02", 10, "b", pol)
        feb = KEYS.period("fay", "2026-02")
        assert client.hmget(feb, "b", "f") == [b"100", b"0"]
        # Grace window over: final bonus from reconciled usage, 300.
        clock.now = datetime(2026, 2, 1, 1, 30, tzinfo=UTC)
        await eventually(lambda: client.hget(KEYS.period("fay", "2026-01"), "x") == b"1",
                         "january closed")  # fmt: skip
        assert client.hmget(feb, "b", "f") == [b"300", b"1"]
        # The open reservation settles late: the bonus is adjusted once.
        await storage.settle(settled("fay", "2026-01", "open", 200, 150, pol))
        await eventually(lambda: client.hget(feb, "b") == b"150", "the adjusted bonus")
        seen = []
        with anyio.fail_after(10):
            async for event in subscription:
                seen.append(event)
                if isinstance(event, PeriodAdjusted):
                    break
        worker.stop()
    kinds = [type(e) for e in events(client)]
    # 700 of 1000 crosses no threshold; the late 150 crosses 80%.
    assert kinds == [PeriodClosed, BudgetThreshold, PeriodAdjusted]
    assert [type(e) for e in seen] == kinds
    closed = next(e for e in seen if isinstance(e, PeriodClosed))
    assert (closed.used, closed.limit, closed.next_period, closed.next_bonus) == (
        700, 1000, "2026-02", 300)  # fmt: skip
    adjusted = seen[-1]
    assert isinstance(adjusted, PeriodAdjusted)
    assert (adjusted.used, adjusted.next_bonus) == (850, 150)
    # A second sweep publishes nothing new: every event once.
    assert await worker.closer.sweep() == 0


async def test_closing_chains_over_idle_months_and_reports_hashed_ids(redis_url: str) -> None:
    pol = policy(limit=100, rollover=True, cap=250)
    user = "~" + "h" * 300  # neither plain nor short: its tag is a hash
    clock = Clock(datetime(2026, 1, 5, tzinfo=UTC))
    client = sync_client(redis_url)
    worker = Worker.from_url(redis_url, WorkerConfig(consumer="c", grace_seconds=0), clock=clock)
    async with RedisStorage.from_url(redis_url, mode="direct", clock=clock) as storage, worker:
        assert await reserve(storage, user, "2026-01", 50, "a", pol)
        await storage.settle(settled(user, "2026-01", "a", 50, 40, pol))
        await worker.reconciler.apply([])  # nothing to do, and harmless
        clock.now = datetime(2026, 4, 2, tzinfo=UTC)
        assert await reserve(storage, user, "2026-04", 10, "b", pol)
        assert await worker.closer.sweep() == 1
    tag = encode_user_id(user)
    # 60 unused in January, plus February and March idle at 100 each: capped at 250.
    assert client.hmget(KEYS.period(tag, "2026-04"), "b", "f") == [b"250", b"1"]
    (closed,) = [e for e in events(client) if isinstance(e, PeriodClosed)]
    # direct mode does not store hashed ids; the tag stands in for them.
    assert closed.user in (user, tag)


# -- budget events ----------------------------------------------------------------------


async def test_threshold_and_exceeded_events_once_per_user_period(
    redis_url: str, workers: Callable[..., WorkerProcess]
) -> None:
    pol = policy(limit=100)
    period = period_of(datetime.now(UTC))  # not closed under the worker's real clock
    client = sync_client(redis_url)
    async with RedisStorage.from_url(redis_url) as storage:
        for n in range(12):
            rid = f"r{n}"
            if await reserve(storage, "gus", period, 10, rid, pol):
                await storage.settle(settled("gus", period, rid, 10, 10, pol))
            else:
                from tokenfirewall.messages import Refused

                await storage.refused(Refused(user="gus", period=period, requested=10,
                                              used=100, limit=100))  # fmt: skip
        workers(redis_url, "--thresholds", "50,80,90")
        await eventually(lambda: drained(client, 12), "all applied")
    got = [(type(e).__name__, getattr(e, "percent", None)) for e in events(client)]
    assert got == [("BudgetThreshold", 50), ("BudgetThreshold", 80), ("BudgetThreshold", 90),
                   ("BudgetExceeded", None)]  # fmt: skip
    assert all(isinstance(e, BudgetThreshold | BudgetExceeded) for e in events(client))


# -- stream trimming -------------------------------------------------------------------------


async def test_streams_are_trimmed_only_below_what_the_group_acknowledged(redis_url: str) -> None:
    from worker.metrics import Metrics
    from worker.trimming import trim_stream

    client = sync_client(redis_url)
    ids = [client.xadd(KEYS.usage, {"m": b"x"}) for _ in range(300)]
    client.xgroup_create(KEYS.usage, GROUP, id="0")
    client.xreadgroup(GROUP, "c", {KEYS.usage: ">"}, count=250)
    client.xack(KEYS.usage, GROUP, *ids[:100], *ids[150:250])
    async with __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(redis_url) as aio:
        await trim_stream(aio, KEYS.usage, Metrics())
    remaining = [entry_id for entry_id, _ in client.xrange(KEYS.usage)]
    assert ids[100] in remaining  # oldest pending survives
    assert remaining[-50:] == ids[250:]  # never-delivered entries survive
    assert set(ids[100:]) <= set(remaining)


# -- logs ----------------------------------------------------------------------------------------


async def test_dead_letters_are_logged_with_the_reason(redis_url: str) -> None:
    client = sync_client(redis_url)
    client.xadd(KEYS.usage, {"m": b"garbage"})
    worker = Worker.from_url(redis_url, WorkerConfig(consumer="c", block_ms=50))
    with capture_logs() as logs:
        async with worker, anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await eventually(lambda: client.xlen(KEYS.dead_letters) == 1, "a dead letter")
            worker.stop()
    (entry,) = [e for e in logs if e["event"] == "dead_lettered"]
    assert entry["reason"].startswith("undecodable")


def test_fake_clock_env_is_read_by_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import cli

    monkeypatch.setenv(cli.FAKE_NOW_ENV, "2026-02-01T02:00:00+00:00")
    clock = cli._clock()
    assert clock is not None
    assert clock() == datetime(2026, 2, 1, 2, tzinfo=UTC)
    monkeypatch.setenv("TOKENFIREWALL_BATCH_SIZE", "77")
    args = cli.build_parser().parse_args(["--thresholds", "70,95"])
    config = cli.config_from(args)
    assert (config.batch_size, config.thresholds) == (77, (70, 95))
    assert timedelta(seconds=config.grace_seconds) == timedelta(hours=1)


# -- the batch script's consume paths --------------------------------------------------


def _reconciler(client: object, config: WorkerConfig | None = None) -> object:
    from worker.closing import PeriodCloser
    from worker.metrics import Metrics
    from worker.publisher import Publisher
    from worker.reconcile import Reconciler

    cfg = config or WorkerConfig(consumer="c")
    metrics = Metrics()
    publisher = Publisher(client, KEYS, metrics, maxlen=1000)
    duty = Duty(client, KEYS, cfg, metrics, publisher, lambda: datetime(2026, 3, 10, tzinfo=UTC))
    return Reconciler(duty, PeriodCloser(duty))


async def _apply_messages(reconciler: object, messages: list[Settled]) -> None:
    from tokenfirewall.messages import encode
    from worker.codec import Entry, Valid, check

    items = [check(Entry(KEYS.usage, b"1-0", {b"m": encode(m)})) for m in messages]
    assert all(isinstance(item, Valid) for item in items)
    assert await reconciler.apply(items) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("cluster", [False, True])
async def test_reserved_settlements_consume_once_by_hdel_and_redelivery_changes_nothing(
    redis_url: str, cluster: bool
) -> None:
    """One HDEL per reservation (a user with few), one HMGET + HDEL (a user with many)."""
    pol = policy()
    period = "2026-03"
    plan = {"solo": [(f"s{n}", 300, 100 + n) for n in range(1)],
            "pair": [(f"p{n}", 200, 50 + n) for n in range(2)],
            "many": [(f"m{n}", 100, 10 * n) for n in range(7)]}  # fmt: skip
    reconciler = _reconciler(redis.asyncio.Redis.from_url(redis_url),
                             WorkerConfig(consumer="c", cluster=cluster))  # fmt: skip
    async with RedisStorage.from_url(redis_url) as storage:
        messages = []
        for user, rows in plan.items():
            for rid, reserved, actual in rows:
                assert await reserve(storage, user, period, reserved, rid, pol)
                messages.append(settled(user, period, rid, reserved, actual, pol))
        # One reservation released on expiry meanwhile: its settlement still
        # applies once, as its full usage.
        client = sync_client(redis_url)
        entry = client.hget(KEYS.reservations("many"), "m3")
        client.hdel(KEYS.reservations("many"), "m3")
        client.hset(KEYS.released("many"), "m3", entry)
        client.decrby(KEYS.budget("many", period), 100)
        # The same settlement twice in one batch, then the whole batch again.
        await _apply_messages(reconciler, messages + messages[-2:])
        await _apply_messages(reconciler, messages)
        for user, rows in plan.items():
            snap = await storage.snapshot(user, period)
            assert snap is not None
            used = sum(actual for _, _, actual in rows)
            assert (snap.used, snap.charged, snap.open_reservations) == (used, used, 0), user
        assert not client.exists(KEYS.released("many"))


async def test_resent_unreserved_settlement_after_a_late_reserve_applies_once(
    redis_url: str,
) -> None:
    pol = policy()
    period = "2026-03"
    reconciler = _reconciler(redis.asyncio.Redis.from_url(redis_url))
    async with RedisStorage.from_url(redis_url) as storage:
        # Admitted without a reservation (Redis seemed down), applied; then the
        # reserve that had timed out lands under the same id; then a resend.
        unreserved = settled("late", period, "x1", 0, 120, pol)
        await _apply_messages(reconciler, [unreserved])
        assert await reserve(storage, "late", period, 300, "x1", pol)
        await _apply_messages(reconciler, [unreserved, unreserved])
        snap = await storage.snapshot("late", period)
        assert snap is not None
        # Applied once; the late reservation stays open until its expiry.
        assert (snap.used, snap.charged, snap.open_reservations) == (120, 420, 1)
        # The reserve landing before the settlement is applied: it is consumed,
        # with the amount it holds, and a resend changes nothing.
        assert await reserve(storage, "late", period, 500, "x2", pol)
        other = settled("late", period, "x2", 0, 70, pol)
        await _apply_messages(reconciler, [other])
        await _apply_messages(reconciler, [other])
        snap = await storage.snapshot("late", period)
        assert snap is not None
        assert (snap.used, snap.charged, snap.open_reservations) == (190, 490, 1)


async def test_pipelined_reader_applies_a_backlog_in_script_chunks_and_acks_it(
    redis_url: str,
) -> None:
    """Batches bigger than one script call: split per user, all applied, all acked."""
    from tokenfirewall.messages import encode
    from worker import reconcile

    pol = policy()
    client = sync_client(redis_url)
    pipe = client.pipeline(transaction=False)
    total = 3 * reconcile.CALL_ENTRIES + 17
    for n in range(total):
        message = settled(f"u{n % 50}", "2026-03", f"b{n}", 0, 2, pol)
        pipe.xadd(KEYS.usage, {"m": encode(message)})
    pipe.xadd(KEYS.usage, {"m": b"{broken"})  # sends that batch through check() one by one
    pipe.execute()
    config = WorkerConfig(consumer="c", block_ms=50, batch_size=2 * reconcile.CALL_ENTRIES)
    worker = Worker.from_url(redis_url, config)
    assert worker.pipelined is not None
    async with worker, anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await eventually(lambda: drained(client, total + 1), "the backlog to be applied")
        worker.stop()
    assert client.xlen(KEYS.dead_letters) == 1
    used = sum(int(client.hget(KEYS.period(f"u{u}", "2026-03"), "u") or 0) for u in range(50))
    assert used == 2 * total
