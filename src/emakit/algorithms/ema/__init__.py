"""Exponential moving average of model weights (see README.md beside this file)."""

from emakit.algorithms.ema.ema import EMA

__all__ = ["EMA"]
