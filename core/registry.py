"""Named registries: one per extension point (students, teachers, datasets, losses, recipes, ...).

A registry maps a name to a factory. Registering a name twice is an error; asking for an unknown
name raises a `KeyError` whose message lists the valid names and suggests the closest one.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def suggest(name: str, valid: list[str]) -> str:
    """' Did you mean "x"?' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f' Did you mean "{close[0]}"?' if close else ""


class UnknownNameError(KeyError):
    """An unknown registry name; `str()` gives the whole message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> object table with a contract stated by `kind` (used in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """`registry.register("x", obj)` or as a decorator `@registry.register("x")`."""
        if obj is None:
            def decorator(item: T) -> T:
                self.register(name, item)
                return item
            return decorator
        if name in self._items:
            raise ValueError(f'{self.kind} "{name}" is already registered; pick another name.')
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        if name not in self._items:
            valid = sorted(self._items)
            raise UnknownNameError(
                f'Unknown {self.kind} "{name}". Valid: {", ".join(valid)}.{suggest(name, valid)}')
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


Factory = Callable[..., T]
