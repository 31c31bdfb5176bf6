"""Callbacks: code that observes the training loop after algorithms have run."""

from emakit.callbacks.checkpoint_saver import CheckpointSaver
from emakit.callbacks.progress import ProgressBar

__all__ = ["CheckpointSaver", "ProgressBar"]
