"""Child processes for tests: ``python -m worker`` and ``uvicorn`` app servers.

Each logs to a file (shown when a test fails) and is SIGKILLed by ``kill()``;
fixtures call it in ``finally`` so no process outlives its test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ROOT", "AppProcess", "ChildProcess", "WorkerProcess"]


class ChildProcess:
    """A child process writing stdout and stderr to one log file."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: frozen, but its sockets (and blocked reads) stay open."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class WorkerProcess(ChildProcess):
    """``python -m worker`` as a child process, logging to a file."""

    def __init__(
        self,
        url: str,
        tmp: Path,
        *args: str,
        env: dict[str, str] | None = None,
        consumer: str = "w1",
        metrics_port: int | None = None,
    ) -> None:
        command = [sys.executable, "-m", "worker", "--redis-url", url, "--consumer", consumer,
                   "--block-ms", "100", "--sweep-interval", "0.2", *args]  # fmt: skip
        if metrics_port is not None:
            command += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
        super().__init__(command, tmp / f"worker-{consumer}-{time.monotonic_ns()}.log", env)
        self.metrics_port = metrics_port

    def is_ready(self) -> bool:
        """``/readyz`` answers 200: every shard's group exists and its reader runs.

        Needs ``metrics_port``; raises if the process has exited.
        """
        if not self.alive:
            raise RuntimeError(f"worker exited:\n{self.output()}")
        try:
            r = httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1.0)
        except httpx.TransportError:
            return False
        return r.status_code == 200


class AppProcess(ChildProcess):
    """``uvicorn <app>`` on 127.0.0.1:``port``; :meth:`wait_ready` polls it over HTTP."""

    def __init__(self, app: str, port: int, tmp: Path, env: dict[str, str]) -> None:
        # A long keep-alive: uvicorn closing an idle pooled connection just as
        # the client reuses it would fail a request for reasons not under test.
        command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning",
                   "--timeout-keep-alive", "120"]  # fmt: skip
        super().__init__(command, tmp / f"app-{port}-{time.monotonic_ns()}.log", env)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll until the server answers any HTTP request; fail fast if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise RuntimeError(f"{self.base_url} exited:\n{self.output()}")
            try:
                httpx.get(self.base_url + "/", timeout=1.0)
                return
            except httpx.TransportError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.base_url} not ready:\n{self.output()}") from None
                time.sleep(0.05)
