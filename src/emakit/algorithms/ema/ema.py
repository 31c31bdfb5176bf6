"""The EMA as a Trainer algorithm: emakit's Trainer events mapped onto the trainer-free :class:`emakit.averaging.EMA`.

The mapping, and nothing else:

========================  ==========================================================================
INIT                      ``attach(model, max_duration=..., batches_per_epoch=...)``
AFTER_LOAD, FIT_START     the EMA's clock is set to the Trainer's timestamp
BATCH_END / EPOCH_END     the clock is set, then ``tick`` starts or blends the average when due
EVAL_START / EVAL_END     the EMA weights are swapped in (once started) / the training weights back
BATCH_START, FIT_END      training weights put back if user code left the EMA's in the model
checkpoints               published checkpoints carry the EMA weights as the model's, the training
                          weights in this algorithm's state (``checkpoint_model_state``)
========================  ==========================================================================
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from emakit.algorithms.publishing import PublishedCheckpoint
from emakit.averaging.ema import EMA as _AveragingEMA
from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.time import TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["EMA"]


class EMA(PublishedCheckpoint, _AveragingEMA, Algorithm):
    """:class:`emakit.averaging.EMA`, runnable by emakit's :class:`~emakit.Trainer` (same arguments).

    The Trainer evaluates on the EMA weights once the average has started, and
    :class:`~emakit.callbacks.CheckpointSaver` saves them as the checkpoint's model weights (the training
    weights ride along in this algorithm's state, so resuming is exact). Outside the Trainer it is the
    plain trainer-free EMA: ``attach``, ``step``, ``average_parameters``, ``state_dict``.
    """

    averages_model = True

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_END:
            return self.update_interval.unit == TimeUnit.BATCH
        if event == Event.EPOCH_END:
            return self.update_interval.unit == TimeUnit.EPOCH
        return event in (
            Event.INIT,
            Event.AFTER_LOAD,
            Event.FIT_START,
            Event.BATCH_START,
            Event.EVAL_START,
            Event.EVAL_END,
            Event.FIT_END,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.attach(state.model, max_duration=state.max_duration, batches_per_epoch=state.batches_per_epoch)
        elif event in (Event.AFTER_LOAD, Event.FIT_START):
            self.timestamp = state.timestamp.copy()
        elif event in (Event.BATCH_END, Event.EPOCH_END):
            self.timestamp = state.timestamp.copy()
            skipped = self.num_skipped_nonfinite
            self.tick(self.update_interval.unit)
            if self.num_skipped_nonfinite != skipped:
                logger.log_metrics(
                    {"ema/num_skipped_nonfinite": float(self.num_skipped_nonfinite)},
                    step=state.timestamp.get(self.update_interval.unit),
                )
        elif event == Event.EVAL_START:
            if self.started:
                self.get_ema_model(state.model)
        else:  # EVAL_END, FIT_END, BATCH_START
            if event == Event.FIT_END:
                self.wait()  # fit() returns a finished average
            if self._swapped is not None and self._is_own(self._swapped):
                if event == Event.BATCH_START:
                    warnings.warn(
                        "the EMA weights were still in the model at the start of a batch; training weights "
                        "restored (call ema.get_training_model(model) after using get_ema_model)",
                        stacklevel=2,
                    )
                self.get_training_model(state.model)
