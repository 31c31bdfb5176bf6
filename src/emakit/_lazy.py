"""Lazy public names for a package (PEP 562): a name's module is imported on first access, then cached.

A package keeps ``import`` cheap (no torch-heavy module, no optional framework) by listing where each public
name lives and installing the two module hooks this returns::

    __getattr__, __dir__ = lazy_names(__name__, __all__, {"EMA": "emakit.algorithms.ema", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    package: str, public: Sequence[str], where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose name ``n`` lives in module ``where[n]``.

    ``__getattr__`` imports the module, caches the name in the package and returns it; other names raise
    AttributeError (submodules need their own import). ``__dir__`` lists ``public`` and the package's dunders.
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        names = vars(sys.modules[package])
        return sorted({*public, *(name for name in names if name.startswith("__"))})

    return __getattr__, __dir__
