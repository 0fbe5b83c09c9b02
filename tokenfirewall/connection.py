"""Redis clients from URLs: single node, Cluster or Sentinel, every call bounded.

Understood URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` (passwords and
ACL users in the URL, as redis-py reads them), and for Sentinel
``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]``
(``rediss+sentinel://`` for TLS to the master); ``?sentinel_password=...``
authenticates to the sentinels themselves.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import Sentinel

from tokenfirewall.errors import ConfigurationError

__all__ = ["SENTINEL_SCHEMES", "connect"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


def connect(url: str, *, cluster: bool = False, timeout: float, **options: Any) -> Any:
    """A client whose socket operations give up after ``timeout`` seconds."""
    settings: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **options,
    }
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        if cluster:
            raise ConfigurationError("a Sentinel URL cannot be used with cluster=True")
        return _sentinel_master(url, settings)
    if cluster:
        return RedisCluster.from_url(url, **settings)
    return Redis.from_url(url, **settings)


def _sentinel_master(url: str, settings: dict[str, Any]) -> Any:
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not hosts or not path:
        raise ConfigurationError(
            "a Sentinel URL needs hosts and a service name: "
            "redis+sentinel://host:26379[,host:26379]/<service>[/<db>]"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    sentinel_options = {
        "socket_timeout": settings["socket_timeout"],
        "socket_connect_timeout": settings["socket_connect_timeout"],
    }
    if "sentinel_password" in query:
        sentinel_options["password"] = query["sentinel_password"]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        [_host_port(h) for h in hosts.split(",")], sentinel_kwargs=sentinel_options
    )
    master_options = dict(settings)
    if username:
        master_options["username"] = unquote(username)
    if password:
        master_options["password"] = unquote(password)
    if len(path) > 1:
        master_options["db"] = int(path[1])
    if parts.scheme.startswith("rediss"):
        master_options["ssl"] = True
    return sentinel.master_for(path[0], **master_options)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 26379
    try:
        return host.strip("[]"), int(port)
    except ValueError as exc:
        raise ConfigurationError(f"bad sentinel address {text!r}") from exc
