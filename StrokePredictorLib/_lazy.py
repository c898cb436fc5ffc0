"""Deferred imports of heavy optional modules.

``from StrokePredictorLib._lazy import sitk`` gives an object that imports SimpleITK on first
attribute access. Pure-array code paths (the network, bundles, GPU training on machines
without SimpleITK) can then import the Lib without paying for, or needing, SimpleITK.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A module stand-in that imports ``target`` when an attribute is first read."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self._target = target
        self._module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if self._module is None:
            self._module = importlib.import_module(self._target)
        return getattr(self._module, name)


sitk: Any = LazyModule("SimpleITK")
