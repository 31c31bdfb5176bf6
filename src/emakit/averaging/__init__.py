"""Weight averaging in any training loop: one :class:`Averager` and the schedules handed to it.

:class:`EMA` and :class:`SWA` are the averager with an exponential or an equal-weight schedule
(:mod:`emakit.averaging.schedules`); no trainer, no events.
"""

from emakit.averaging.averager import Averager
from emakit.averaging.batchnorm import batch_statistics
from emakit.averaging.ema import EMA
from emakit.averaging.momentum import CosineMomentum, MomentumFunction
from emakit.averaging.schedules import Constant, EqualWeights, Power, Schedule
from emakit.averaging.swa import SWA
from emakit.averaging.warmup import Warmup

__all__ = [
    "EMA",
    "SWA",
    "Averager",
    "Constant",
    "CosineMomentum",
    "EqualWeights",
    "MomentumFunction",
    "Power",
    "Schedule",
    "Warmup",
    "batch_statistics",
]
