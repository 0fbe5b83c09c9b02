"""Lua scripts shipped as package data, loaded once and run by SHA."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

__all__ = ["Script", "load_script"]


class Script:
    """One script: ``common.lua`` followed by the script's own file."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def _read(filename: str) -> str:
    return resources.files("tokenfirewall.storage").joinpath("lua", filename).read_text("utf-8")


@cache
def load_script(name: str) -> Script:
    return Script(name, _read("common.lua") + "\n" + _read(f"{name}.lua"))
