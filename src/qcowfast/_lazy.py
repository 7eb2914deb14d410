"""Modules imported on first use: paths that never need numpy (converting a plain image,
`info`) start without it (0.05-0.2 s of a process's start-up)."""
from __future__ import annotations

import importlib
import sys


class LazyModule:
    """Stands for module `name` as global `alias` of module `owner`; the first attribute
    looked up imports it and puts the real module in its place, so later look-ups cost
    nothing extra."""

    def __init__(self, name: str, owner: str, alias: str):
        self._target = (name, owner, alias)

    def __getattr__(self, attr: str):
        name, owner, alias = self._target
        module = importlib.import_module(name)
        setattr(sys.modules[owner], alias, module)
        return getattr(module, attr)
