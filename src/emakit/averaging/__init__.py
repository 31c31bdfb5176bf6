"""The averaging itself, usable in any training loop: :class:`EMA` (no trainer, no events)."""

from emakit.averaging.ema import EMA
from emakit.averaging.warmup import Warmup

__all__ = ["EMA", "Warmup"]
