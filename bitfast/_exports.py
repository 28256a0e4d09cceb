"""How a package of bitfast finds its own modules, so that adding a module (an op, its
reference, a benchmark definition) needs no edit of a central list: import every module of
the package's folder that a name rule selects, and optionally re-export their ``__all__``.
Standard library only (any layer may use it)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, MutableMapping
from types import ModuleType

__all__ = ["export_submodules", "import_submodules"]


def import_submodules(package: str, select: Callable[[str], bool]) -> list[ModuleType]:
    """Import the modules of ``package``'s folder whose names ``select`` accepts, in name order."""
    path = importlib.import_module(package).__path__
    names = sorted(info.name for info in pkgutil.iter_modules(path))
    return [importlib.import_module(f"{package}.{name}") for name in names if select(name)]


def export_submodules(namespace: MutableMapping, select: Callable[[str], bool]) -> list[str]:
    """Import the selected modules of the package whose ``namespace`` (its ``globals()``) this
    is, bind every name of each one's ``__all__`` there, and return those names in order."""
    exported = []
    for module in import_submodules(namespace["__name__"], select):
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
            exported.append(name)
    return exported
