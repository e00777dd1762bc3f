"""Package faces that import on first use.

A package re-exports its API (`quant.export_run`) without importing the module behind it until
the name is used: `python -m quant.export` then runs a module that its package has not imported
already (runpy warns otherwise), and `import edge` stays as light as numpy.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: `name` is imported from `package.<homes[name]>`."""
    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
    return __getattr__
