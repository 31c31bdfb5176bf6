"""emakit: exponential moving averages of PyTorch model weights.

Two interfaces: the functional :func:`compute_ema` for any training loop, and the averagers :class:`EMA` and
:class:`SWA`, which run in any loop and which :class:`Trainer` and the framework callbacks drive at the right
moments (evaluating and checkpointing with the averaged weights).

The names below are resolved on first use (PEP 562 ``__getattr__``): ``import emakit`` alone loads
only :mod:`emakit._version`, not torch, so that ``emakit --help`` and ``emakit --version`` answer at once.
``from emakit import EMA`` imports what ``EMA`` needs at that moment; type checkers and IDEs read the
``TYPE_CHECKING`` imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emakit._lazy import lazy_names
from emakit._version import __version__

if TYPE_CHECKING:
    from emakit.averaging import BEMA, EMA, SWA
    from emakit.callbacks.checkpoint_saver import CheckpointSaver
    from emakit.core.event import Event
    from emakit.distributed import export_ema_weights
    from emakit.functional import compute_ema
    from emakit.time import Time, Timestamp, TimeUnit
    from emakit.trainer import Trainer

__all__ = [
    "BEMA",
    "EMA",
    "SWA",
    "CheckpointSaver",
    "Event",
    "Time",
    "TimeUnit",
    "Timestamp",
    "Trainer",
    "__version__",
    "compute_ema",
    "export_ema_weights",
]

#: Where each public name lives; the one list to change when a module moves.
_LAZY: dict[str, str] = {
    "EMA": "emakit.averaging",
    "SWA": "emakit.averaging",
    "BEMA": "emakit.averaging",
    "CheckpointSaver": "emakit.callbacks.checkpoint_saver",
    "Event": "emakit.core.event",
    "Time": "emakit.time",
    "TimeUnit": "emakit.time",
    "Timestamp": "emakit.time",
    "Trainer": "emakit.trainer",
    "compute_ema": "emakit.functional",
    "export_ema_weights": "emakit.distributed",
}


__getattr__, __dir__ = lazy_names(__name__, __all__, _LAZY)
