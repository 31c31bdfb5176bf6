"""What emakit's Trainer runs at events: :class:`~emakit.algorithms.averaging.Averaging`, which holds an averager.

The EMA's method card (hyperparameters, memory, what checkpoints hold) is ``algorithms/ema/README.md``.
"""

from emakit.algorithms.averaging import Averaging

__all__ = ["Averaging"]
