"""Small helpers shared by the client's modules."""

from __future__ import annotations


class LazyModule:
    """A module imported on first use: numpy and the shard format stay out of
    `lepton-ctl`'s start-up unless a data command needs them."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
