"""The README's first command: the demo runs on the embedded default."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_without_redis_and_shows_rollover() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenfirewall.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = done.stdout
    assert "Period 2026-11" in out
    assert "Period 2026-12" in out
    december = out.split("Period 2026-12")[1]
    bob = next(line for line in december.splitlines() if line.startswith("bob"))
    assert "28,000" in bob  # 20,000 + the 8,000 carry-over cap
    assert '"error": "Monthly token budget exceeded"' in out
