"""A read-only view of an HTTP request, handed to user callbacks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

from tokenfirewall.types import Scope

__all__ = ["Headers", "Request"]


class Headers(Mapping[str, str]):
    """Case-insensitive headers from an ASGI scope (latin-1, first value wins)."""

    __slots__ = ("_items", "_map")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._items = raw
        self._map: dict[str, str] | None = None

    def _lookup(self) -> dict[str, str]:
        if self._map is None:
            mapping: dict[str, str] = {}
            for key, value in self._items:
                mapping.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
            self._map = mapping
        return self._map

    def __getitem__(self, key: str) -> str:
        return self._lookup()[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._lookup()

    def get(self, key: str, default: Any = None) -> Any:
        return self._lookup().get(key.lower(), default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup())

    def __len__(self) -> int:
        return len(self._lookup())


class Request:
    """What ``extract_user_id`` and ``on_budget_exceeded`` receive."""

    __slots__ = ("_headers", "body", "scope")

    def __init__(self, scope: Scope, body: bytes = b"") -> None:
        self.scope = scope
        self.body = body
        self._headers: Headers | None = None

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(self.scope.get("headers", []))
        return self._headers

    @property
    def method(self) -> str:
        return str(self.scope.get("method", "GET"))

    @property
    def path(self) -> str:
        return str(self.scope.get("path", "/"))

    @property
    def user(self) -> Any:
        """``scope["user"]`` when an authentication middleware set it."""
        return self.scope.get("user")

    @property
    def state(self) -> Any:
        """``scope["state"]`` as an attribute namespace (Starlette-compatible)."""
        state = self.scope.setdefault("state", {})
        if isinstance(state, dict):
            return SimpleNamespace(**state)
        return state

    @property
    def client(self) -> tuple[str, int] | None:
        client = self.scope.get("client")
        return (str(client[0]), int(client[1])) if client else None
