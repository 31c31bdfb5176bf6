"""State: everything the training loop shares with algorithms and callbacks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.time import Time, Timestamp, progress

if TYPE_CHECKING:
    from emakit.core.algorithm import Algorithm
    from emakit.core.callback import Callback

__all__ = ["State"]


@dataclass
class State:
    """The training run's shared state.

    ``model`` is the module being trained (possibly wrapped in DDP); outside EVAL_START..EVAL_END it holds
    the training weights. ``timestamp`` counts completed batches, epochs and samples.
    """

    model: nn.Module
    max_duration: Time
    train_dataloader: Iterable[Any] | None = None
    eval_dataloader: Iterable[Any] | None = None
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    algorithms: list[Algorithm] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    timestamp: Timestamp = field(default_factory=Timestamp)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batches_per_epoch: int | None = None
    rank: int = 0
    world_size: int = 1
    batch: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    #: RNG states captured at the start of the current epoch, before its data iterator was created; a run
    #: resumed inside an epoch restores them to replay the same shuffle.
    epoch_start_rng: dict[str, Any] | None = None

    @property
    def progress(self) -> float:
        """Fraction of ``max_duration`` completed."""
        return progress(self.timestamp, self.max_duration, self.batches_per_epoch)

    @property
    def is_done(self) -> bool:
        """Whether training has reached ``max_duration``."""
        return self.progress >= 1.0
