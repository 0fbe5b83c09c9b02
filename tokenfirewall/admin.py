"""``tokenfirewall``: the operator's command line (argparse and output only).

What each command does to Redis lives in :mod:`tokenfirewall.admin_ops`. Exit
codes: 0 success, 2 anything the operator must fix (bad arguments, an
unreachable or refusing Redis, a missing record), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

from tokenfirewall.admin_ops import (
    Admin,
    AdminError,
    EventEntry,
    ReportRow,
    Status,
    connect,
    current_period,
)
from tokenfirewall.config import MAX_LIMIT, Policy
from tokenfirewall.errors import ConfigurationError
from tokenfirewall.periods import month_index

__all__ = ["build_parser", "main"]

URL_ENV = "TOKENFIREWALL_REDIS_URL"
PREFIX_ENV = "TOKENFIREWALL_PREFIX"
EXIT_ERROR = 2


# -- argument types ------------------------------------------------------------


def _period(text: str) -> str:
    try:
        month_index(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _amount(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not minimum <= value <= MAX_LIMIT:
            raise argparse.ArgumentTypeError(f"must be between {minimum} and {MAX_LIMIT}")
        return value

    return parse


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError("must be between 0 and 300 seconds")
    return value


# -- parser --------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The global options; subcommands accept them too (after the command)."""

    def default(value: Any) -> Any:
        # SUPPRESS on subcommands: an option given before the command is not
        # overwritten by the subcommand's default.
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--redis-url",
        default=default(os.environ.get(URL_ENV, "redis://localhost:6379/0")),
        help=f"redis://[user:password@]host:port/db, rediss:// or unix:// (env {URL_ENV})",
    )
    parser.add_argument(
        "--prefix",
        default=default(os.environ.get(PREFIX_ENV, "tokenfirewall")),
        help=f"key prefix (env {PREFIX_ENV})",
    )
    parser.add_argument(
        "--cluster", action="store_true", default=default(False), help="Redis Cluster"
    )
    parser.add_argument(
        "--timeout", type=_timeout, default=default(2.0), help="seconds per Redis call"
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="JSON output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenfirewall",
        description="Inspect and adjust per-user token budgets stored in Redis.",
        epilog="User ids starting with '-' go after '--', e.g. status -- -alice.",
    )
    _connection_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    period_help = "YYYY-MM (default: the current UTC month)"
    status = command("status", "a user's budget in one period")
    status.add_argument("user")
    status.add_argument("--period", type=_period, help=period_help)

    limit = command("set-limit", "set or clear a user's monthly limit override")
    limit.add_argument("user")
    limit.add_argument("limit", nargs="?", type=_amount(0), help="tokens per month")
    limit.add_argument("--clear", action="store_true", help="remove the override")
    limit.add_argument("--period", type=_period, help="period record to update now; " + period_help)

    grant = command("grant", "one-off top-up of a user's period")
    grant.add_argument("user")
    grant.add_argument("tokens", type=_amount(1))
    grant.add_argument("--period", type=_period, help=period_help)
    grant.add_argument(
        "--limit", type=_amount(0), help="create a missing record with this monthly limit"
    )
    grant.add_argument("--rollover", action="store_true", help="with --limit: rollover on")
    grant.add_argument("--max-carryover", type=_amount(0), help="with --rollover: the cap")

    report = command("report", "users of one period by tokens charged")
    report.add_argument("--period", type=_period, help=period_help)
    report.add_argument("--top", type=_amount(1), help="only the first K users")

    events = command("events", "budget events")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    tail = events_sub.add_parser("tail", parents=[common], help="the latest budget events")
    tail.add_argument("--count", type=_amount(1), default=20)
    tail.add_argument("--follow", action="store_true", help="then wait for new ones (Ctrl-C)")

    close = command("close-period", "close every user record of an ended period now")
    close.add_argument("period", type=_period)
    close.add_argument("--retention-days", type=float, default=400.0)
    close.add_argument("--force", action="store_true", help="close a period not ended yet")
    return parser


# -- output --------------------------------------------------------------------


def _safe(text: str) -> str:
    """User ids are anyone's strings: never let one drive the terminal."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _emit(args: argparse.Namespace, value: Any, human: Callable[[], str]) -> None:
    if args.json:
        is_record = dataclasses.is_dataclass(value) and not isinstance(value, type)
        data = dataclasses.asdict(value) if is_record else value
        print(json.dumps(data, ensure_ascii=True), flush=True)
    else:
        print(human(), flush=True)


def _status_text(s: Status) -> str:
    if not s.exists:
        head = f"user {_safe(s.user)!s}: no usage recorded in {s.period}"
        return head + (f"\noverride   {s.override}" if s.override is not None else "")
    bonus = "final" if s.bonus_final else "provisional"
    rows = [
        ("user", _safe(s.user)),
        ("period", f"{s.period}{' (closed)' if s.closed else ''}"),
        ("used", f"{s.used}  (reconciled)"),
        ("charged", f"{s.charged}  (used + {s.open_reservations} open reservations)"),
        ("limit", f"{s.limit}  = monthly {s.monthly_limit} + bonus {s.bonus} + granted "
                  f"{s.granted}"),
        ("bonus", f"{s.bonus} ({bonus})"),
        ("remaining", str(s.remaining)),
        ("reset", s.reset_at),
        ("override", "none" if s.override is None else str(s.override)),
    ]  # fmt: skip
    return "\n".join(f"{name:<10} {value}" for name, value in rows)


def _report_text(rows: Sequence[ReportRow], period: str) -> str:
    if not rows:
        return f"no users in {period}"
    header = f"{'USER':<32} {'CHARGED':>12} {'USED':>12} {'LIMIT':>12} {'REMAINING':>12} {'%':>5}"
    lines = [header]
    for r in rows:
        pct = f"{100 * r.charged / r.limit:.0f}" if r.limit else "-"
        lines.append(
            f"{_safe(r.user):<32} {r.charged:>12} {r.used:>12} {r.limit:>12} "
            f"{r.remaining:>12} {pct:>5}{' closed' if r.closed else ''}"
        )
    return "\n".join(lines)


def _event_line(args: argparse.Namespace, entry: EventEntry) -> str:
    if args.json:
        return json.dumps(dataclasses.asdict(entry), ensure_ascii=True)
    if entry.event is None:
        return f"{entry.id}  (undecodable) {_safe(entry.raw or '')}"
    event = dict(entry.event)
    kind, user = event.pop("type", "?"), event.pop("user", "?")
    event.pop("v", None)
    rest = " ".join(f"{k}={v}" for k, v in event.items())
    return f"{entry.id}  {kind:<17} user={_safe(str(user))} {rest}"


# -- commands ------------------------------------------------------------------


async def _status(admin: Admin, args: argparse.Namespace) -> int:
    status = await admin.status(args.user, args.period or current_period())
    _emit(args, status, lambda: _status_text(status))
    return 0


async def _set_limit(admin: Admin, args: argparse.Namespace) -> int:
    if args.clear == (args.limit is not None):
        raise AdminError("give either a limit or --clear")
    change = await admin.set_limit(args.user, args.limit, args.period or current_period())
    now = "none" if change.override is None else change.override
    applied = (
        f"; {change.period} record now has limit {change.period_limit}"
        if change.period_limit is not None
        else f"; no open {change.period} record (applies when it is created)"
    )
    _emit(args, change, lambda: f"override of {_safe(change.user)}: {now}{applied}")
    return 0


async def _grant(admin: Admin, args: argparse.Namespace) -> int:
    policy = None
    if args.limit is not None:
        cap = args.max_carryover if args.max_carryover is not None else args.limit
        policy = Policy(monthly_limit=args.limit, rollover=args.rollover, max_carryover=cap)
    elif args.rollover or args.max_carryover is not None:
        raise AdminError("--rollover and --max-carryover only apply with --limit")
    result = await admin.grant(args.user, args.tokens, args.period or current_period(), policy)
    _emit(
        args,
        result,
        lambda: (
            f"{_safe(result.user)} {result.period}: granted {result.granted} in total "
            f"(limit now {result.monthly_limit + result.bonus + result.granted})"
        ),
    )
    return 0


async def _report(admin: Admin, args: argparse.Namespace) -> int:
    period = args.period or current_period()
    rows = await admin.report(period, args.top)
    _emit(args, [dataclasses.asdict(r) for r in rows], lambda: _report_text(rows, period))
    return 0


async def _events(admin: Admin, args: argparse.Namespace) -> int:
    last = await admin.last_event_id()
    for entry in await admin.tail(args.count):
        print(_event_line(args, entry), flush=True)
    # Block for less than the socket timeout, or the read would time out.
    block_ms = max(1, int(args.timeout * 500))
    while args.follow:
        for entry in await admin.follow(last, block_ms):
            print(_event_line(args, entry), flush=True)
            last = entry.id
    return 0


async def _close_period(admin: Admin, args: argparse.Namespace) -> int:
    if month_index(args.period) >= month_index(current_period()) and not args.force:
        raise AdminError(f"{args.period} has not ended yet (use --force to close it anyway)")
    found, closed = await admin.close_period(args.period, args.retention_days)
    summary = {"period": args.period, "records": found, "closed": closed}
    _emit(
        args,
        summary,
        lambda: (
            f"{args.period}: closed {closed} of {found} records "
            f"({found - closed} were closed already)"
        ),
    )
    return 0


COMMANDS = {
    "status": _status,
    "set-limit": _set_limit,
    "grant": _grant,
    "report": _report,
    "events": _events,
    "close-period": _close_period,
}


async def _run(args: argparse.Namespace) -> int:
    admin = Admin(connect(args.redis_url, cluster=args.cluster, timeout=args.timeout), args.prefix)
    try:
        # One bounded round trip first: "unreachable" is reported within the
        # timeout, whatever the client library's connect logic does.
        async with asyncio.timeout(args.timeout):
            await admin.ping()
        return await COMMANDS[args.command](admin, args)
    finally:
        with contextlib.suppress(RedisError, OSError):  # a connection that never opened
            await admin.aclose()


def redact(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _explain(exc: BaseException, args: argparse.Namespace) -> str:
    where = redact(args.redis_url)
    if isinstance(exc, AuthenticationError):
        return f"Redis at {where} refused the credentials: {exc}"
    if isinstance(exc, ResponseError):
        return f"Redis at {where} refused the command: {exc}"
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"cannot reach Redis at {where}: no answer within {args.timeout}s"
    return f"cannot reach Redis at {where} within {args.timeout}s: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    if not structlog.is_configured():
        # Library logs must not mix with the command's (possibly JSON) output.
        # Resolved at each log call: sys.stderr may be swapped (tests, daemons).
        structlog.configure(logger_factory=lambda *_: structlog.PrintLogger(sys.stderr))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        return asyncio.run(_run(args))
    except (AdminError, ConfigurationError) as exc:
        message = str(exc)
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        message = _explain(exc, args)
    except KeyboardInterrupt:
        return 130
    print(f"tokenfirewall: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
