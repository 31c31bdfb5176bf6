"""SWA as a Trainer algorithm: emakit's Trainer events mapped onto the trainer-free :class:`emakit.averaging.SWA`.

The mapping, and nothing else:

========================  ==========================================================================
INIT                      ``attach(model, max_duration=..., batches_per_epoch=...)``
AFTER_LOAD, FIT_START     the clock is set to the Trainer's timestamp
BATCH_START               with ``swa_lr``: the learning rate of the window (annealed, then constant)
BATCH_END / EPOCH_END     the clock is set, ``tick`` opens, averages or closes the window; when it closes,
                          BatchNorm statistics of the average are recomputed over the training data
FIT_END                   a window without ``swa_end`` closes here (and BatchNorm is recomputed)
EVAL_START / EVAL_END     the averaged weights are swapped in (once started) / the training weights back
checkpoints               as the EMA's: the average is published as the model, training weights ride along
========================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from emakit.algorithms.publishing import PublishedCheckpoint
from emakit.averaging.clock import start_due
from emakit.averaging.swa import SWA as _AveragingSWA
from emakit.core.algorithm import Algorithm
from emakit.core.batches import split_pair, to_device
from emakit.core.event import Event
from emakit.engine.naming import unwrap_model
from emakit.rng import capture_rng, loader_generators, restore_rng
from emakit.time import TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["SWA"]


class SWA(PublishedCheckpoint, _AveragingSWA, Algorithm):
    """:class:`emakit.averaging.SWA`, runnable by emakit's :class:`~emakit.Trainer` (same arguments).

    The Trainer evaluates on the averaged weights once the window has opened; when it closes (at
    ``swa_end``, or at the end of training) the average's BatchNorm statistics are recomputed over the
    training data, so that evaluation, checkpoints and exports use the averaged model as it should run.
    With ``swa_lr`` the learning rate follows torch's ``SWALR`` rule inside the window.
    """

    averages_model = True

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_END:
            return self.update_interval.unit == TimeUnit.BATCH
        if event == Event.EPOCH_END:
            return self.update_interval.unit == TimeUnit.EPOCH
        return event in (Event.INIT, Event.AFTER_LOAD, Event.FIT_START, Event.BATCH_START, Event.EVAL_START,
                         Event.EVAL_END, Event.FIT_END)  # fmt: skip

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.attach(state.model, max_duration=state.max_duration, batches_per_epoch=state.batches_per_epoch)
        elif event in (Event.AFTER_LOAD, Event.FIT_START):
            self.timestamp = state.timestamp.copy()
        elif event in (Event.BATCH_END, Event.EPOCH_END):
            self.timestamp = state.timestamp.copy()
            was_closed = self.window_closed
            self.tick(self.update_interval.unit)
            if self.window_closed and not was_closed:
                self._finish(state)
        elif event == Event.EVAL_START:
            if self.started:
                self.get_ema_model(state.model)
        else:  # EVAL_END, FIT_END, BATCH_START
            if self._swapped is not None and self._is_own(self._swapped):
                self.get_training_model(state.model)
            if event == Event.BATCH_START and self.swa_lr is not None:
                self._set_learning_rate(state)
            if event == Event.FIT_END and self.started and not self.window_closed:
                self.close_window()
                self._finish(state)

    def _finish(self, state: State) -> None:
        """The window closed: recompute BatchNorm over the training data (the training RNG left as it was)."""
        if not self.bn_update or self.bn_updated or not self.started or state.train_dataloader is None:
            return
        model_loss = callable(getattr(unwrap_model(state.model), "loss", None))

        def forward(model: torch.nn.Module, batch: Any) -> None:
            batch = to_device(batch, state.device)
            model(batch if model_loss else split_pair(batch)[0])

        generators = loader_generators(state.train_dataloader)
        drawn = capture_rng(generators)
        try:
            self.update_bn(state.train_dataloader, state.model, forward)
        finally:
            restore_rng(drawn, generators)

    def _set_learning_rate(self, state: State) -> None:
        """torch's SWALR inside the window: from the rates at ``swa_start`` to ``swa_lr`` over ``anneal_time``."""
        assert self.swa_lr is not None
        if self.lr_start_batch is None:
            if not start_due(self.ema_start, state.timestamp, state.max_duration, state.batches_per_epoch):
                return
            self.lr_start_batch = state.timestamp.batch
            self.lr_base = [[float(g["lr"]) for g in opt.param_groups] for opt in state.optimizers]
        anneal = int(self.anneal_time.value)
        if self.anneal_time.unit == TimeUnit.EPOCH:
            if not state.batches_per_epoch:
                raise ValueError(f"anneal_time='{self.anneal_time}' needs a train_dataloader with a length; give 'ba'")
            anneal *= state.batches_per_epoch
        done = 1.0 if anneal <= 0 else min(1.0, (state.timestamp.batch - self.lr_start_batch) / anneal)
        left = (1 + math.cos(math.pi * done)) / 2 if self.anneal_strategy == "cos" else 1 - done
        for opt, bases in zip(state.optimizers, self.lr_base, strict=True):
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["lr"] = self.swa_lr + (base - self.swa_lr) * left

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "swa_lr_start_batch": self.lr_start_batch, "swa_lr_base": self.lr_base}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.lr_start_batch = state.get("swa_lr_start_batch")
        self.lr_base = [list(bases) for bases in state.get("swa_lr_base", [])]
