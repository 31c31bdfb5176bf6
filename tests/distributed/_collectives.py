"""Counting the collectives a block of code runs, for the tests that an EMA update communicates nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class _CollectiveOps(TorchDispatchMode):
    """Records every c10d operator dispatched while active: ``dist.all_reduce``/``barrier``/... (``c10d.*``) and
    the functional collectives DTensor and FSDP2 use (``_c10d_functional.*``), however they are called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if "c10d" in func.namespace:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_collectives() -> Iterator[list[str]]:
    """The collectives run inside the block, by operator name."""
    with _CollectiveOps() as mode:
        yield mode.calls
