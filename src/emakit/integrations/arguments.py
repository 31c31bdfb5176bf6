"""The framework callbacks' signatures, derived from the averagers' (written once, in the averager's ``__init__``).

``EMACallback(half_life="200ba", ...)`` takes exactly :class:`~emakit.EMA`'s arguments, then its own keyword-only
ones; its ``__init__`` receives them as ``*args, **kwargs`` and hands them to the averager, which checks them.
:func:`derived_signature` gives that ``__init__`` the signature users and ``help()`` see.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["derived_signature", "keyword"]


def derived_signature(averager: type, own: Sequence[inspect.Parameter]) -> Callable[[Callable[..., Any]], Any]:
    """Decorate a callback's ``__init__(self, *args, <own>, **kwargs)`` with the signature
    ``(self, <averager's arguments>, *, <own>)``."""
    taken = list(inspect.signature(averager.__init__).parameters.values())  # type: ignore[misc]
    signature = inspect.Signature([*taken, *own])

    def decorate(init: Callable[..., Any]) -> Any:
        init.__signature__ = signature  # type: ignore[attr-defined]
        return init

    return decorate


def keyword(name: str, default: Any, annotation: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """A keyword-only parameter of a callback's own."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
