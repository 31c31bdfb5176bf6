"""emakit: exponential moving averages of PyTorch model weights.

Two interfaces: the functional :func:`compute_ema` for any training loop, and the :class:`EMA` algorithm
that :class:`Trainer` runs at the right moments (evaluating and checkpointing with the EMA weights).
"""

from emakit.algorithms.ema import EMA
from emakit.callbacks.checkpoint_saver import CheckpointSaver
from emakit.core.event import Event
from emakit.functional import compute_ema
from emakit.time import Time, Timestamp, TimeUnit
from emakit.trainer import Trainer

__version__ = "0.1.0"

__all__ = ["EMA", "CheckpointSaver", "Event", "Time", "TimeUnit", "Timestamp", "Trainer", "__version__", "compute_ema"]
