"""Algorithms the Trainer runs at events."""

from emakit.algorithms.ema import EMA

__all__ = ["EMA"]
