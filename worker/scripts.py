"""The worker's Lua scripts: ``common.lua`` + shared libraries + the script body."""

from __future__ import annotations

from functools import cache
from importlib import resources

from tokenfirewall.storage.scripts import Script

__all__ = ["close_script", "expire_script", "settle_many_script"]


def _read(filename: str) -> str:
    return resources.files("tokenfirewall.storage").joinpath("lua", filename).read_text("utf-8")


def _compose(name: str, *libraries: str) -> Script:
    parts = ["common.lua", *(f"{lib}.lua" for lib in libraries), f"{name}.lua"]
    return Script(name, "\n".join(_read(part) for part in parts))


@cache
def settle_many_script() -> Script:
    return _compose("settle_many", "rollover")


@cache
def close_script() -> Script:
    return _compose("close", "rollover")


@cache
def expire_script() -> Script:
    return _compose("expire", "rollover")
