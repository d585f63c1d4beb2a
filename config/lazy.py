"""Lazy public surfaces (PEP 562): a package names what it offers and from which of its
modules, and a module is imported on first use of a name, so that ``vcemri --help`` and the
commands that do not need torch, SimpleITK or highdicom start fast."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_attributes(package: str, names: Mapping[str, str],
                    renamed: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps each public name to the module
    (relative to the package) that defines it, ``renamed`` the public names that the module
    spells otherwise."""
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{names[name]}", package), renamed.get(name, name))

    return __getattr__
