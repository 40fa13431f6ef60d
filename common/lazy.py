"""Modules loaded on first use, so an agent does not pay at start (in RSS and import time)
for what its configuration never calls: `cryptography` (~9 MB) without TLS or an
encrypted shard store."""

from __future__ import annotations

import importlib
from typing import Any


class Deferred:
    """Stands for module `module` (or its attribute `name`): the import happens when an
    attribute is first read. For attribute access only (`x509.Name(...)`,
    `except errors.InvalidTag`); isinstance, calls and `except` need the real object, so
    read it through the module: `deferred("m").Class`."""

    def __init__(self, module: str, name: str = ""):
        self._module = module
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        target: Any = importlib.import_module(self._module)
        if self._name:
            target = getattr(target, self._name)
        return getattr(target, attr)

    def __repr__(self) -> str:
        return f"<deferred {self._module}{'.' + self._name if self._name else ''}>"


def deferred(module: str, name: str = "") -> Any:
    """A `Deferred` for `module` (or `module.name`), typed Any for its users."""
    return Deferred(module, name)
