"""Algorithms the Trainer runs at events."""

from emakit.algorithms.ema import EMA
from emakit.algorithms.swa import SWA

__all__ = ["EMA", "SWA"]
