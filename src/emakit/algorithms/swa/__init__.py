"""Stochastic Weight Averaging as a Trainer algorithm (see the SWA section of the EMA method card)."""

from emakit.algorithms.swa.swa import SWA

__all__ = ["SWA"]
