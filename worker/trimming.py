"""Keeping streams bounded without ever dropping an entry a group still needs."""

from __future__ import annotations

from typing import Any

from worker.consumer import id_tuple
from worker.metrics import Metrics

__all__ = ["trim_stream"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def trim_stream(client: Any, stream: str, metrics: Metrics) -> int:
    """XTRIM MINID to the oldest entry some group has not yet delivered and acked.

    With no group at all nothing is trimmed here (the usage stream keeps its
    entries for the first worker; the events stream is capped by XADD MAXLEN).
    """
    try:
        groups = await client.xinfo_groups(stream)
    except Exception as exc:  # no such key yet
        if "no such key" in str(exc).lower():
            return 0
        raise
    if not groups:
        return 0
    floor: tuple[int, int] | None = None
    pending_total = 0
    for group in groups:
        ms, seq = id_tuple(_text(group["last-delivered-id"]))
        candidate = (ms, seq + 1)
        pending = int(group["pending"])
        pending_total += pending
        if pending:
            summary = await client.xpending(stream, group["name"])
            if summary["min"] is not None:  # acked in between: nothing older is pending
                candidate = min(candidate, id_tuple(_text(summary["min"])))
        floor = candidate if floor is None else min(floor, candidate)
        if group.get("lag") is not None:
            metrics.lag_entries.labels(stream=stream).set(int(group["lag"]))
    metrics.pending.labels(stream=stream).set(pending_total)
    if floor is None:
        return 0
    # "~" may leave a few entries more, never fewer: safe and much cheaper.
    trimmed = int(await client.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=True))
    metrics.trimmed.labels(stream=stream).inc(trimmed)
    return trimmed
