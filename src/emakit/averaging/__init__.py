"""The averaging itself, usable in any training loop: :class:`EMA` and :class:`SWA` (no trainer, no events)."""

from emakit.averaging.ema import EMA
from emakit.averaging.swa import SWA
from emakit.averaging.warmup import Warmup

__all__ = ["EMA", "SWA", "Warmup"]
