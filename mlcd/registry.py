"""Name -> implementation registries: objectives, evaluators, datasets, models and input
transforms are all picked by name from config through one `Registry` each.

    OBJECTIVES = Registry("objective", autoload=("mlcd.objectives",))

    @OBJECTIVES.register("mlcd")
    class MLCD(Objective): ...

    OBJECTIVES.get(config.objective.name, key="config.objective.name")   # -> the class

Registration happens when the defining module is imported. `autoload` names packages whose
modules are imported on the first lookup, so a new method is one new module in such a package
and no hand-written import list has to learn about it. Code outside those packages (a test, a
user's own module) registers by importing this registry and decorating its class; it must be
imported before the lookup.

An unknown name raises `UnknownNameError`, one error type for every registry, whose message
names the config key (when given), the name and every registered name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any


class UnknownNameError(ValueError):
    """A name that no module registered; the message lists the registered names."""


class Registry:
    """A name -> object table for one kind of plug-in (see the module docstring)."""

    def __init__(self, kind: str, *, autoload: Sequence[str] = ()):
        """kind: what the entries are, for messages ('objective', 'evaluator', ...).
        autoload: packages whose modules are imported on the first lookup."""
        self.kind = kind
        self._autoload = tuple(autoload)
        self._loaded = not self._autoload
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator registering a class or function under `name` (each name once)."""

        def wrap(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return wrap

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package_name in self._autoload:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package_name}.{info.name}")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str, *, key: str | None = None) -> Any:
        """The object registered as `name`.

        Args:
          name: the registered name.
          key: the config key that gave the name (e.g. 'config.objective.name'), for the
            message.

        Raises:
          UnknownNameError: no such name; the message lists the registered ones.
        """
        self._load()
        if name not in self._entries:
            where = f"{key}={name!r}: " if key else ""
            raise UnknownNameError(
                f"{where}unknown {self.kind} {name!r}; known: {sorted(self._entries)}"
            )
        return self._entries[name]
