"""Weight averaging in any training loop: one :class:`Averager` and the schedules handed to it.

:class:`EMA`, :class:`SWA` and :class:`BEMA` are the averager with an exponential, an equal-weight or a
bias-corrected schedule (:mod:`emakit.averaging.schedules`); teacher momentum schedules
(:mod:`emakit.averaging.momentum`) go to ``EMA(schedule=...)``. No trainer, no events.
"""

from emakit.averaging.averager import Averager
from emakit.averaging.batchnorm import batch_statistics
from emakit.averaging.bema import BEMA
from emakit.averaging.ema import EMA
from emakit.averaging.momentum import CosineMomentum, MomentumFunction
from emakit.averaging.schedules import (
    BiasCorrected,
    Constant,
    EqualWeights,
    GrowingHalfLife,
    PerAmount,
    Power,
    Schedule,
)
from emakit.averaging.swa import SWA
from emakit.averaging.warmup import Warmup

__all__ = [
    "BEMA",
    "EMA",
    "SWA",
    "Averager",
    "BiasCorrected",
    "Constant",
    "CosineMomentum",
    "EqualWeights",
    "GrowingHalfLife",
    "MomentumFunction",
    "PerAmount",
    "Power",
    "Schedule",
    "Warmup",
    "batch_statistics",
]
