"""Print every budget.exceeded event (run several: the group shares the work)."""

from __future__ import annotations

import os

import anyio

from tokenfirewall.events import subscribe

REDIS_URL = os.environ.get("TOKENFIREWALL_REDIS_URL", "redis://localhost:6379/0")


async def main() -> None:
    async with subscribe(REDIS_URL, group="alerts", kinds={"budget.exceeded"}) as events:
        async for event in events:
            # Acknowledged when this body finishes: a crash here means redelivery.
            print(f"{event.user} exceeded {event.limit} tokens in {event.period}", flush=True)


if __name__ == "__main__":
    anyio.run(main)
