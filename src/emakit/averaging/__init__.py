"""The averaging itself, usable in any training loop: :class:`EMA` (no trainer, no events)."""

from emakit.averaging.ema import EMA

__all__ = ["EMA"]
