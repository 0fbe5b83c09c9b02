"""Run every benchmark (each in its own process and redis-server) and print a markdown table.

    .venv/bin/python bench/run_all.py [--quick]

``--quick`` shrinks every run (smoke test; figures are noisier).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import RESULT_MARK, machine

HERE = Path(__file__).resolve().parent
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    # script: (full arguments, --quick arguments)
    "latency.py": ([], ["--requests", "1000"]),
    "cpu.py": ([], ["--requests", "3200", "--rounds", "2"]),
    "memory.py": ([], ["--users", "10000"]),
    "peers.py": ([], ["--calls", "1000"]),
}


def run(script: str, args: list[str]) -> list[dict[str, Any]]:
    command = [sys.executable, str(HERE / script), *args]
    print(f"$ {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    sys.stderr.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return [{"bench": script, "name": "FAILED", "value": float("nan"), "unit": "",
                 "target": "", "ok": False}]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARK))
    figures: list[dict[str, Any]] = json.loads(line[len(RESULT_MARK):])
    return figures


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("pass" if ok else "**FAIL**")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| bench | figure | value | target | verdict |", "| --- | --- | ---: | --- | --- |"]
    for row in rows:
        value = f"{row['value']:.3f} {row['unit']}"
        lines.append(f"| {row['bench']} | {row['name'].strip()} | {value} | {row['target']} "
                     f"| {verdict(row['ok'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for script, (full, quick) in SCRIPTS.items():
        rows += run(script, quick if args.quick else full)
    print("\n".join(f"- {key}: {value}" for key, value in machine().items()))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
