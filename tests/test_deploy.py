"""Every file in ``deploy/`` parses and names only what really exists.

The valid names are derived from the code at test time, never hard-coded:

- entry points: ``[project.scripts]`` of pyproject.toml (and they import);
- worker flags and ``TOKENFIREWALL_*`` variables: the worker's argparse parser
  (each variable is found in its flag's help and then proven to be read: set
  it, rebuild the parser, and the flag's default must be the value);
- metric series: ``worker.metrics.Metrics`` on a fresh registry, exposed the
  way ``/metrics`` exposes it (``_total``, ``_bucket``, ... included);
- health paths: the real health server, started on a free port and asked.

A manifest naming a flag, variable, metric, label or path that does not exist
fails here. ``docs/operations.md`` is held to the same names.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from tests.support.servers import RedisServer, RedisServerError, find_redis_server
from worker.cli import build_parser, config_from
from worker.config import WorkerConfig
from worker.health import serve_health
from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
WORKER_SCRIPT = "tokenfirewall-worker"
ENV_PREFIX = "TOKENFIREWALL_"
BASE_IMAGE = "python:3.11-slim"
# Labels Prometheus attaches to every scraped series (not the worker's own).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service"})
PROMQL_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

ENV_NAME_RE = re.compile(r"\bTOKENFIREWALL_[A-Z0-9_]+")
METRIC_RE = re.compile(r"\btokenfirewall_[a-z0-9_]+")
SELECTOR_RE = re.compile(r"\b(tokenfirewall_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
URL_PATH_RE = re.compile(r"https?://[^/'\"\s]+(/[A-Za-z0-9_./-]*)")
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|min|sec|h|m|s)?")


# -- what really exists ------------------------------------------------------------


@functools.cache
def console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


@functools.cache
def worker_env() -> dict[str, argparse.Action]:
    """``TOKENFIREWALL_*`` variable -> the worker flag it sets, from the parser."""
    found: dict[str, argparse.Action] = {}
    for action in build_parser()._actions:
        for name in ENV_NAME_RE.findall(action.help or ""):
            found[name] = action
    return found


@functools.cache
def worker_flags() -> frozenset[str]:
    return frozenset(s for a in build_parser()._actions for s in a.option_strings)


@dataclass(frozen=True)
class MetricNames:
    families: frozenset[str]
    series: frozenset[str]  # what /metrics exposes: counters with _total, ...
    labels: Mapping[str, frozenset[str]]  # series -> its label names


@functools.cache
def metric_names() -> MetricNames:
    metrics = Metrics(CollectorRegistry())
    for metric in vars(metrics).values():
        # Labelled metrics expose no series before a first child exists.
        names = getattr(metric, "_labelnames", ())
        if isinstance(metric, MetricWrapperBase) and names:
            metric.labels(*["x"] * len(names))
    families: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        families.add(family.name)
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    assert families, "the worker's metrics registry is empty"
    return MetricNames(
        frozenset(families), frozenset(labels), {k: frozenset(v) for k, v in labels.items()}
    )


def shutdown_timeout() -> float:
    return WorkerConfig(consumer="test").shutdown_timeout


# -- checks shared by every format -------------------------------------------------


def _expected(action: argparse.Action, value: str) -> Any:
    if action.nargs == 0:  # store_true: the worker accepts 1/true/yes
        return value.lower() in ("1", "true", "yes")
    return action.type(value) if callable(action.type) else value


def check_worker_env(env: Mapping[str, str | None], where: str) -> None:
    """Names must be worker variables; values (None: set at run time) must parse."""
    known = worker_env()
    unknown = sorted(set(env) - set(known))
    assert not unknown, f"{where}: not environment variables of {WORKER_SCRIPT}: {unknown}"
    valued = {name: value for name, value in env.items() if value is not None}
    with pytest.MonkeyPatch.context() as patch:
        for name in known:
            patch.delenv(name, raising=False)
        for name, value in valued.items():
            patch.setenv(name, value)
        args = build_parser().parse_args([])
        config_from(args)  # raises on an invalid value or combination
    for name, value in valued.items():
        action = known[name]
        got = getattr(args, action.dest)
        assert got == _expected(action, value), (
            f"{where}: {name}={value!r} is not read by {WORKER_SCRIPT} "
            f"({action.option_strings[0]} became {got!r})"
        )


def check_worker_args(argv: list[str], where: str) -> None:
    flags = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    unknown = sorted(flags - worker_flags())
    assert not unknown, f"{where}: not flags of {WORKER_SCRIPT}: {unknown}"
    try:
        config_from(build_parser().parse_args(argv))
    except SystemExit as exc:
        pytest.fail(f"{where}: {WORKER_SCRIPT} rejects {argv}: exit {exc.code}")


def check_entry_point(command: str, where: str, expected: str = WORKER_SCRIPT) -> None:
    name = Path(command).name
    assert name in console_scripts(), f"{where}: {command!r} is not a console script"
    assert name == expected, f"{where}: runs {name!r}, expected {expected!r}"


def check_text_names(text: str, where: str, *, allow_families: bool = False) -> None:
    """Every ``TOKENFIREWALL_*`` and ``tokenfirewall_*`` token anywhere must exist."""
    env = sorted(set(ENV_NAME_RE.findall(text)) - set(worker_env()))
    assert not env, f"{where}: unknown worker environment variables {env}"
    names = metric_names()
    valid = names.series | (names.families if allow_families else frozenset())
    metrics = sorted(set(METRIC_RE.findall(text)) - valid)
    assert not metrics, f"{where}: unknown metric names {metrics} (real: {sorted(valid)})"


def check_promql(expr: str, where: str) -> set[str]:
    """Metric names and label names of one expression; returns the metrics used."""
    check_text_names(expr, where)
    names = metric_names()
    assert expr.count("(") == expr.count(")"), f"{where}: unbalanced parentheses: {expr}"
    assert expr.count("{") == expr.count("}"), f"{where}: unbalanced braces: {expr}"
    for metric, matchers in SELECTOR_RE.findall(expr):
        bad = set(MATCHER_RE.findall(matchers)) - names.labels[metric] - TARGET_LABELS
        assert not bad, f"{where}: {metric} has no label {sorted(bad)}"
    every_label = set().union(*names.labels.values()) | TARGET_LABELS
    for group in GROUPING_RE.findall(expr):
        used = {label.strip() for label in group.split(",") if label.strip()}
        bad = used - every_label
        assert not bad, f"{where}: no metric has label {sorted(bad)}: {expr}"
    return set(METRIC_RE.findall(expr))


def seconds(text: str | int | float) -> float:
    if isinstance(text, int | float):
        return float(text)
    total = 0.0
    factors = {None: 1, "s": 1, "sec": 1, "ms": 0.001, "us": 1e-6, "m": 60, "min": 60, "h": 3600}
    rest = text.replace(" ", "")
    while rest:
        match = DURATION_RE.match(rest)
        assert match is not None, f"not a duration: {text!r}"
        assert match.end() > 0, f"not a duration: {text!r}"
        total += float(match.group(1)) * factors[match.group(2)]
        rest = rest[match.end() :]
    return total


# -- parsers -----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


DOCKER_KEYWORDS = frozenset(
    {
        "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
        "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
    }
)  # fmt: skip


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        logical: list[tuple[int, str]] = []
        buffer, start = "", 0
        for number, raw in enumerate(text.splitlines(), 1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue  # comments may sit inside a continued instruction
            if not buffer:
                start = number
            if stripped.endswith("\\"):
                buffer += stripped[:-1] + " "
                continue
            logical.append((start, buffer + stripped))
            buffer = ""
        assert not buffer, "Dockerfile ends inside a continued line"
        args: dict[str, str] = {}
        stages: list[Stage] = []
        for number, line in logical:
            keyword, _, rest = line.partition(" ")
            keyword = keyword.upper()
            assert keyword in DOCKER_KEYWORDS, f"Dockerfile:{number}: unknown {keyword}"
            rest = rest.strip()
            if keyword == "FROM":
                words = rest.split()
                base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                stages.append(Stage(name, base))
            elif not stages:
                assert keyword == "ARG", f"Dockerfile:{number}: {keyword} before FROM"
                key, _, value = rest.partition("=")
                args[key] = value
            else:
                stages[-1].instructions.append(Instruction(keyword, rest, number))
        return cls(args, stages)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"Dockerfile has no stage {name!r}")

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        names = {s.name for s in self.stages}
        chain = [stage]
        while chain[0].base in names:
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def last(self, chain: list[Stage], keyword: str) -> Instruction | None:
        found = [i for stage in chain for i in stage.all(keyword)]
        return found[-1] if found else None

    def env(self, chain: list[Stage]) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in chain:
            for instruction in stage.all("ENV"):
                for word in shlex.split(instruction.args):
                    key, _, value = word.partition("=")
                    env[key] = value
        return env


def exec_form(instruction: Instruction | None) -> list[str]:
    assert instruction is not None
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"line {instruction.line}: use the exec (JSON) form"
    return [str(v) for v in value]


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None, f"unit line {number}: outside a section: {raw!r}"
        assert sep, f"unit line {number}: not a key=value: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert values, f"unit has no {key}="
    return values[-1]


def parse_env_file(text: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"env line {number}: not a KEY=value: {raw!r}"
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"env line {number}: {raw!r}"
        env[key] = shlex.split(value)[0] if value else ""
    return env


def parse_redis_conf(text: str) -> dict[str, list[list[str]]]:
    directives: dict[str, list[list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        directives.setdefault(words[0].lower(), []).append(words[1:])
    return directives


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def parse_any(path: Path) -> object:
    text = path.read_text()
    if path.name == "Dockerfile":
        return Dockerfile.parse(text)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml(path)
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".service":
        return parse_unit(text)
    if path.suffix == ".env":
        return parse_env_file(text)
    if path.name == "redis.conf":
        return parse_redis_conf(text)
    raise AssertionError(f"{path}: no parser for this file in tests/test_deploy.py")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- every file --------------------------------------------------------------------


def test_deploy_has_the_expected_files() -> None:
    for name in (
        "Dockerfile", "compose.yaml", "redis.conf", "systemd/tokenfirewall-worker.service",
        "grafana/tokenfirewall-worker.json", "prometheus/alerts.yaml",
        "kubernetes/statefulset.yaml",
    ):  # fmt: skip
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"


@pytest.mark.parametrize("path", deploy_files(), ids=rel)
def test_every_deploy_file_parses_and_names_real_things(path: Path) -> None:
    assert parse_any(path) is not None
    check_text_names(path.read_text(), rel(path))


def test_console_scripts_import() -> None:
    assert WORKER_SCRIPT in console_scripts()
    for name, target in console_scripts().items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_checks_catch_unknown_names() -> None:
    with pytest.raises(AssertionError, match="TOKENFIREWALL_NO_SUCH"):
        check_worker_env({"TOKENFIREWALL_NO_SUCH": "1"}, "probe")
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_worker_args(["--no-such-flag", "1"], "probe")
    with pytest.raises(AssertionError, match="tokenfirewall_worker_no_such"):
        check_promql("rate(tokenfirewall_worker_no_such_total[5m])", "probe")
    with pytest.raises(AssertionError, match="no label"):
        check_promql('tokenfirewall_worker_pending{shard="0"}', "probe")
    # Counters are exposed with _total only: the bare family name is no series.
    with pytest.raises(AssertionError, match="unknown metric"):
        check_promql("rate(tokenfirewall_worker_dead_letters[5m])", "probe")
    check_worker_env({"TOKENFIREWALL_SHARDS": "4", "TOKENFIREWALL_CLUSTER": "true"}, "probe")


# -- Dockerfile --------------------------------------------------------------------


def dockerfile() -> Dockerfile:
    return Dockerfile.parse((DEPLOY / "Dockerfile").read_text())


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        body = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(body):
            if body.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif body.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif body[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif body[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(body[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pattern in patterns:
        if any(pattern.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_final_image() -> None:
    df = dockerfile()
    final = df.stages[-1]
    chain = df.chain(final)
    assert chain[0].base == BASE_IMAGE
    for stage in df.stages:
        assert stage.base == BASE_IMAGE or stage.base in {s.name for s in df.stages}, stage
    # Multi-stage: a build stage outside the final chain builds the wheels,
    # the final chain installs them offline into a virtualenv.
    builders = [s for s in df.stages if s not in chain]
    assert any("pip wheel" in i.args for s in builders for i in s.all("RUN"))
    installs = [i.args for s in chain for i in s.all("RUN")]
    offline = re.compile(r"pip\"?\s+install\s+--no-index")
    assert any("venv" in r and offline.search(r) for r in installs), installs
    for run in installs:
        assert not re.search(r"apt-get|apk |gcc|build-essential|\bmake\b", run), run
    user = df.last(chain, "USER")
    assert user is not None, "the final image has no USER"
    assert user.args.split(":")[0] not in ("root", "0"), "the final image runs as root"
    entrypoint = exec_form(df.last(chain, "ENTRYPOINT"))
    check_entry_point(entrypoint[0], "Dockerfile ENTRYPOINT")
    extra = entrypoint[1:] + (exec_form(df.last(chain, "CMD")) if df.last(chain, "CMD") else [])
    check_worker_args(extra, "Dockerfile ENTRYPOINT/CMD")
    env = df.env(chain)
    check_worker_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}, "Dockerfile ENV")
    port = env.get("TOKENFIREWALL_METRICS_PORT")
    assert port, "the image must set TOKENFIREWALL_METRICS_PORT (no health server without it)"
    exposed = {p.split("/")[0] for s in chain for i in s.all("EXPOSE") for p in i.args.split()}
    assert port in exposed, f"metrics port {port} not EXPOSEd ({exposed})"
    healthcheck = df.last(chain, "HEALTHCHECK")
    assert healthcheck is not None
    assert "urllib" in healthcheck.args
    assert not re.search(r"\b(curl|wget)\b", healthcheck.args)
    stop = df.last(chain, "STOPSIGNAL")
    assert stop is None or stop.args in ("SIGTERM", "15")


def test_dockerfile_copies_exist_and_are_in_the_context() -> None:
    df = dockerfile()
    patterns = dockerignore_patterns()
    for stage in df.stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            words = [w for w in copy.args.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in copy.args.split()):
                continue
            for source in words[:-1]:
                path = ROOT / source
                assert path.exists(), f"Dockerfile:{copy.line}: {source} does not exist"
                files = [path] if path.is_file() else [*path.rglob("*.py"), *path.rglob("*.lua")]
                for file in files:
                    if "__pycache__" in file.parts:
                        continue
                    relative = str(file.relative_to(ROOT))
                    assert not dockerignored(relative, patterns), (
                        f"Dockerfile:{copy.line}: {relative} is excluded by .dockerignore"
                    )
    assert dockerignored(".venv/bin/python", patterns) or not patterns
    # An app stage serving with uvicorn copies the module it names.
    for stage in df.stages:
        entry = stage.all("ENTRYPOINT")
        if entry and exec_form(entry[-1])[0] == "uvicorn":
            module = next(a for a in exec_form(entry[-1])[1:] if ":" in a).split(":")[0]
            assert stage_copies(stage, module.replace(".", "/") + ".py"), (stage.name, module)


def stage_copies(stage: Stage, relative: str) -> bool:
    """Whether a COPY of ``stage`` puts repository file ``relative`` under the same path."""
    for copy in stage.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        for source in words[:-1]:
            source = source.rstrip("/")
            inside = relative == source or relative.startswith(source + "/")
            if inside and (ROOT / relative).is_file() and words[-1].rstrip("/").endswith(source):
                return True
    return False


def stage_sources(stage: Stage) -> str:
    """The text of every Python file a stage copies from the repository."""
    texts = []
    for copy in stage.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        for source in words[:-1]:
            path = ROOT / source
            files = [path] if path.is_file() else sorted(path.rglob("*.py"))
            texts += [f.read_text() for f in files if f.suffix == ".py"]
    return "\n".join(texts)


# -- compose -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def compose_env(service: Mapping[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def compose_worker() -> tuple[str, dict[str, Any]]:
    df = dockerfile()
    for name, service in compose()["services"].items():
        target = (service.get("build") or {}).get("target")
        if target and exec_form(df.last(df.chain(df.stage(target)), "ENTRYPOINT"))[0] == (
            WORKER_SCRIPT
        ):
            return name, service
    raise AssertionError("compose.yaml has no service built as the worker")


def test_compose() -> None:
    doc = compose()
    services: dict[str, Any] = doc["services"]
    df = dockerfile()
    stage_names = {s.name for s in df.stages}
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown {dependency}"
        build = service.get("build")
        if build:
            context = (DEPLOY / build.get("context", ".")).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert build.get("target") in stage_names, f"{name}: no stage {build.get('target')}"
    # Redis with deploy/redis.conf mounted and used.
    redis = next(s for s in services.values() if str(s.get("image", "")).startswith("redis:7"))
    mounts = [str(v).split(":") for v in redis.get("volumes", [])]
    conf = [m for m in mounts if m[0].endswith("redis.conf")]
    assert conf
    assert (DEPLOY / conf[0][0]).resolve() == DEPLOY / "redis.conf"
    assert conf[0][1] in " ".join(map(str, redis.get("command", []))), "redis.conf not loaded"
    # The worker: real variables, real flags, a metrics port, a long stop grace.
    name, worker = compose_worker()
    env = compose_env(worker)
    check_worker_env(env, f"compose {name}")
    assert env.get("TOKENFIREWALL_REDIS_URL"), "the worker needs TOKENFIREWALL_REDIS_URL"
    command = worker.get("command") or []
    check_worker_args(shlex.split(command) if isinstance(command, str) else command, name)
    port = env.get("TOKENFIREWALL_METRICS_PORT")
    assert port
    assert any(str(p).endswith(f":{port}") for p in worker.get("ports", []))
    assert seconds(worker["stop_grace_period"]) > shutdown_timeout()
    assert worker["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    # The example services: only variables their code reads, scripts it copies.
    for other, service in services.items():
        target = (service.get("build") or {}).get("target")
        if not target or other == name:
            continue
        stage = df.stage(target)
        source = stage_sources(stage)
        assert source, f"compose {other}: stage {target} copies no Python code"
        for variable in compose_env(service):
            assert variable in source, f"compose {other}: the app never reads {variable}"
        for arg in service.get("entrypoint") or []:
            if str(arg).endswith(".py"):
                assert stage_copies(stage, str(arg)), f"compose {other}: {arg} is not in the image"


# -- Kubernetes --------------------------------------------------------------------


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.y*ml")):
        for doc in load_yaml(path):
            found.setdefault(doc["kind"], []).append(doc | {"__file__": path.name})
    return found


def test_kubernetes_manifests() -> None:
    docs = k8s_docs()
    everything = [d for kind in docs.values() for d in kind]
    for doc in everything:
        assert "namespace" not in doc.get("metadata", {}), f"{doc['__file__']}: names a namespace"
    (kustomization,) = docs["Kustomization"]
    listed = set(kustomization["resources"])
    for path in (DEPLOY / "kubernetes").glob("*.y*ml"):
        if path.name != "kustomization.yaml" and ".example." not in path.name:
            assert path.name in listed, f"{path.name} is not in kustomization.yaml"
    assert all((DEPLOY / "kubernetes" / r).is_file() for r in listed)

    (configmap,) = docs["ConfigMap"]
    (statefulset,) = docs["StatefulSet"]
    (service,) = docs["Service"]
    (pdb,) = docs["PodDisruptionBudget"]
    secrets = {s["metadata"]["name"]: s for s in docs.get("Secret", [])}
    data: dict[str, str] = {k: str(v) for k, v in configmap["data"].items()}
    assert "TOKENFIREWALL_REDIS_URL" not in data, "the Redis URL belongs in a Secret"

    spec = statefulset["spec"]
    pod = spec["template"]
    labels: dict[str, str] = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["serviceName"] == service["metadata"]["name"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > shutdown_timeout()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    if "command" in container:
        check_entry_point(container["command"][0], "StatefulSet command")
    check_worker_args([str(a) for a in container.get("args", [])], "StatefulSet args")
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert [r["configMapRef"]["name"] for r in container["envFrom"]] == [
        configmap["metadata"]["name"]
    ]
    env = {e["name"]: e for e in container.get("env", [])}
    consumer = env["TOKENFIREWALL_CONSUMER"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert consumer == "metadata.name", "stable consumer names come from the pod name"
    secret_ref = env["TOKENFIREWALL_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    if secret_ref["name"] in secrets:
        secret = secrets[secret_ref["name"]]
        assert secret_ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
    assert not set(env) & set(data), "a variable set both in the ConfigMap and the pod"
    all_env: dict[str, str | None] = {**data, **{n: e.get("value") for n, e in env.items()}}
    check_worker_env(all_env, "StatefulSet + ConfigMap")

    port = int(data["TOKENFIREWALL_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert ports.get(http["port"], http["port"]) == port, f"{probe} misses the metrics port"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    assert service["spec"]["selector"].items() <= labels.items()
    for service_port in service["spec"]["ports"]:
        target = service_port["targetPort"]
        assert ports.get(target, target) == port
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- systemd -----------------------------------------------------------------------


def test_systemd_unit() -> None:
    unit = parse_unit((DEPLOY / "systemd" / "tokenfirewall-worker.service").read_text())
    service = unit["Service"]
    assert unit_value(service, "Type") == "simple"
    assert unit_value(service, "Restart") == "on-failure"
    assert unit_value(service, "KillSignal") in ("SIGTERM", "TERM")
    assert seconds(unit_value(service, "TimeoutStopSec")) > shutdown_timeout()
    assert unit_value(service, "DynamicUser") == "yes"
    assert unit_value(service, "NoNewPrivileges") == "yes"
    assert unit_value(service, "ProtectSystem") in ("strict", "full")
    command = shlex.split(unit_value(service, "ExecStart").lstrip("-@:+!"))
    assert command[0].startswith("/"), "systemd needs an absolute ExecStart path"
    check_entry_point(command[0], "ExecStart")
    check_worker_args(command[1:], "ExecStart")
    environment: dict[str, str | None] = {}
    for key, value in service:
        if key == "Environment":
            for word in shlex.split(value):
                name, _, val = word.partition("=")
                environment[name] = val
    check_worker_env(
        {k: v for k, v in environment.items() if k.startswith(ENV_PREFIX)}, "Environment="
    )
    env_file = unit_value(service, "EnvironmentFile").lstrip("-")
    assert env_file.startswith("/")
    assert "WantedBy" in dict(unit["Install"])


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.env")), ids=rel)
def test_environment_files(path: Path) -> None:
    check_worker_env(parse_env_file(path.read_text()), rel(path))


# -- redis.conf --------------------------------------------------------------------


def test_redis_conf_keeps_budgets() -> None:
    conf = parse_redis_conf((DEPLOY / "redis.conf").read_text())
    single = {k: v[-1] for k, v in conf.items()}
    assert single["appendonly"] == ["yes"]
    assert single["appendfsync"][0] in ("everysec", "always")
    assert single["maxmemory-policy"] == ["noeviction"]
    duplicated = sorted(k for k, v in conf.items() if len(v) > 1 and k != "save")
    assert not duplicated, f"directives set twice: {duplicated}"


class _ConfRedis(RedisServer):
    def __init__(self, conf: Path) -> None:
        super().__init__(appendonly=True)
        self.conf = conf

    def command_line(self) -> list[str]:
        binary, *rest = super().command_line()
        return [binary, str(self.conf), *rest]  # the file first, overrides after


def test_redis_server_accepts_redis_conf() -> None:
    try:
        find_redis_server()
    except RedisServerError as exc:
        pytest.skip(str(exc))
    with _ConfRedis(DEPLOY / "redis.conf") as server:
        client = server.client(decode_responses=True)
        try:
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
            assert client.config_get("appendonly")["appendonly"] == "yes"
        finally:
            client.close()


# -- Prometheus and Grafana --------------------------------------------------------


def test_prometheus_alerts() -> None:
    (doc,) = load_yaml(DEPLOY / "prometheus" / "alerts.yaml")
    seen: set[str] = set()
    used: set[str] = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            assert name not in seen, f"duplicate alert {name}"
            seen.add(name)
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
            assert rule["annotations"]["summary"], name
            seconds(rule.get("for", "0s"))
            used |= check_promql(rule["expr"], f"alert {name}")
            runbook = rule["annotations"].get("runbook", "")
            if runbook.startswith("docs/"):
                assert (ROOT / runbook.split("#")[0]).is_file(), f"{name}: {runbook}"
    assert any("up{" in r["expr"] or "absent(" in r["expr"]
               for g in doc["groups"] for r in g["rules"])  # fmt: skip
    for family in ("lag_seconds", "dead_letters", "pending"):
        assert any(family in metric for metric in used), f"no alert on {family}"


def test_grafana_dashboard() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "tokenfirewall-worker.json").read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    every_label = set().union(*metric_names().labels.values()) | TARGET_LABELS
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used |= check_promql(target["expr"], f"panel {panel['title']!r}")
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= every_label, f"panel {panel['title']!r}: legend {legend}"
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            used |= check_promql(query["query"], f"variable {variable['name']}")
    families = metric_names().families
    required = (
        "events_applied", "lag_seconds", "lag_entries", "pending", "dead_letters",
        "reservations_expired", "periods_closed", "periods_adjusted", "budget_events",
        "batch_seconds",
    )  # fmt: skip
    for short in required:
        family = f"tokenfirewall_worker_{short}"
        assert family in families, f"the worker no longer has {family}"
        assert any(m.startswith(family) for m in used), f"no panel shows {family}"
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert "histogram_quantile" in exprs
    assert "tokenfirewall_worker_batch_seconds_bucket" in exprs


# -- health endpoints: asked of the real server ------------------------------------


def health_references() -> list[tuple[str, str]]:
    refs: list[tuple[str, str]] = []
    df = dockerfile()
    healthcheck = df.last(df.chain(df.stages[-1]), "HEALTHCHECK")
    assert healthcheck is not None
    refs += [("Dockerfile HEALTHCHECK", p) for p in URL_PATH_RE.findall(healthcheck.args)]
    _, worker = compose_worker()
    test = " ".join(map(str, worker["healthcheck"]["test"]))
    refs += [("compose healthcheck", p) for p in URL_PATH_RE.findall(test)]
    docs = k8s_docs()
    for statefulset in docs["StatefulSet"]:
        for container in statefulset["spec"]["template"]["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    refs.append((f"kubernetes {probe}", container[probe]["httpGet"]["path"]))
    for service in docs["Service"]:
        path = service["metadata"].get("annotations", {}).get("prometheus.io/path")
        if path:
            refs.append(("kubernetes prometheus.io/path", path))
    assert len(refs) >= 5, refs
    return refs


def healthcheck_commands(port: int) -> list[tuple[str, list[str], dict[str, str]]]:
    """The Dockerfile and compose health checks, aimed at ``port``."""
    df = dockerfile()
    healthcheck = df.last(df.chain(df.stages[-1]), "HEALTHCHECK")
    assert healthcheck is not None
    words = shlex.split(healthcheck.args)
    command = words[words.index("CMD") + 1 :]
    if command and command[0].startswith("["):
        command = json.loads(healthcheck.args[healthcheck.args.index("[") :])
    assert command[0] == "python", command
    image_env = df.env(df.chain(df.stages[-1]))
    commands = [
        (
            "Dockerfile HEALTHCHECK",
            [sys.executable, *command[1:]],
            {**image_env, "TOKENFIREWALL_METRICS_PORT": str(port), "PATH": "/usr/bin:/bin"},
        )
    ]
    _, worker = compose_worker()
    test = [str(t) for t in worker["healthcheck"]["test"]]
    argv = test[1:] if test[0] == "CMD" else ["sh", "-c", *test[1:]]
    metrics_port = compose_env(worker)["TOKENFIREWALL_METRICS_PORT"]
    assert any(f":{metrics_port}/" in a for a in argv), "compose health check misses the port"
    argv = [a.replace(f":{metrics_port}/", f":{port}/") for a in argv]
    if argv[0] == "python":
        argv[0] = sys.executable
    commands.append(("compose healthcheck", argv, {"PATH": "/usr/bin:/bin"}))
    return commands


async def _status(port: int, path: str) -> int:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(5):
            while b"\r\n" not in data:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    return int(data.split(b" ", 2)[1])


async def _run_all(commands: Iterable[tuple[str, list[str], dict[str, str]]]) -> dict[str, int]:
    codes: dict[str, int] = {}
    for where, argv, env in commands:
        with anyio.fail_after(20):
            result = await anyio.run_process(argv, env=env, check=False)
        codes[where] = result.returncode
    return codes


async def test_health_paths_and_checks_hit_the_real_health_server() -> None:
    references = health_references()
    registry = Metrics(CollectorRegistry()).registry
    listening = anyio.Event()
    ports: list[int] = []

    def on_listening(port: int) -> None:
        ports.append(port)
        listening.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_health, "127.0.0.1", 0, registry, lambda: True, on_listening)
        with anyio.fail_after(10):
            await listening.wait()
        port = ports[0]
        assert await _status(port, "/no-such-path") == 404, "the probe cannot tell paths apart"
        for where, path in references:
            assert await _status(port, path) == 200, f"{where}: {path} is not served"
        codes = await _run_all(healthcheck_commands(port))
        assert codes == dict.fromkeys(codes, 0), f"health checks failed: {codes}"
        tg.cancel_scope.cancel()
    # With the server gone the same checks must fail, or they check nothing.
    codes = await _run_all(healthcheck_commands(port))
    assert all(code != 0 for code in codes.values()), f"health checks pass with no server: {codes}"


# -- docs/operations.md ------------------------------------------------------------


def test_operations_doc_names_real_things() -> None:
    if not OPERATIONS_DOC.exists():
        pytest.skip("docs/operations.md not written yet")
    text = OPERATIONS_DOC.read_text()
    check_text_names(text, "docs/operations.md", allow_families=True)
    for family in sorted(metric_names().families):
        assert family in text, f"docs/operations.md does not document metric {family}"
    for line in text.splitlines():
        for tail in line.split(WORKER_SCRIPT)[1:]:
            # The command up to the end of its code span, pipe or comment.
            tail = re.split(r"`|\||&&| #", tail)[0].rstrip(" \\")
            words = shlex.split(tail) if tail.startswith(" -") else []
            words = [w for w in words if w not in ("--help", "-h")]
            check_worker_args(words, f"docs/operations.md: {line.strip()}")
    for link in re.findall(r"\]\(((?:\.\./|\./)?[\w./-]+\.(?:md|ya?ml|json|conf|service))", text):
        assert (OPERATIONS_DOC.parent / link).resolve().exists(), f"broken link {link}"
