"""Any averager (:class:`~emakit.EMA`, :class:`~emakit.SWA`) run by emakit's Trainer: its events mapped onto the verbs.

``Trainer(algorithms=[EMA(half_life="50ba")])`` wraps each averager it is given in :class:`Averaging`, which
holds it and translates events, nothing more:

========================  ==========================================================================
INIT                      ``attach(model, max_duration=..., batches_per_epoch=...)``
AFTER_LOAD, FIT_START     the averager's clock is set to the Trainer's timestamp
BATCH_START               training weights put back if user code left the average in the model; with
                          an SWA's ``swa_lr``, the learning rate of the window (torch's ``SWALR`` rule)
BATCH_END / EPOCH_END     the clock is set, then ``tick`` starts, blends or closes the average when due;
                          ``finish_window`` recomputes BatchNorm once the window has closed
EVAL_START / EVAL_END     the averaged weights are swapped in (once started) / the training weights back
FIT_END                   ``finish_window(end_of_training=True)`` (an SWA window closes here)
checkpoints               published checkpoints carry the average as the model's weights, the training
                          weights in this algorithm's state (``training_weights``)
========================  ==========================================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, final

import torch

from emakit.averaging import SWA, Averager
from emakit.averaging.replicated import own_training
from emakit.core.algorithm import Algorithm
from emakit.core.batches import split_pair, to_device
from emakit.core.event import Event
from emakit.engine.naming import unwrap_model
from emakit.time import TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["Averaging"]


@final
class Averaging(Algorithm):
    """Runs ``averager`` at the Trainer's events; its state in checkpoints is under the averager's class name."""

    averages_model = True

    def __init__(self, averager: Averager) -> None:
        if not isinstance(averager, Averager):
            raise TypeError(f"averager must be an emakit averager (EMA, SWA), got {type(averager).__name__}")
        self.averager = averager
        #: torch's SWALR inside an SWA window: the batch it began at and each optimizer's group rates then.
        self._lr_start_batch: int | None = None
        self._lr_base: list[list[float]] = []

    @property
    def name(self) -> str:
        """``'EMA'`` or ``'SWA'``: the key of the averager's state in checkpoints."""
        return type(self.averager).__name__

    def match(self, event: Event, state: State) -> bool:
        unit = self.averager.update_interval.unit
        if event == Event.BATCH_END:
            return unit == TimeUnit.BATCH
        if event == Event.EPOCH_END:  # also when write-back copies at epoch ends
            return unit == TimeUnit.EPOCH or self.averager.writeback.acts_on(TimeUnit.EPOCH)
        return event in (Event.INIT, Event.AFTER_LOAD, Event.FIT_START, Event.BATCH_START, Event.EVAL_START,
                         Event.EVAL_END, Event.FIT_END)  # fmt: skip

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        averager = self.averager
        if event == Event.INIT:
            averager.attach(state.model, max_duration=state.max_duration, batches_per_epoch=state.batches_per_epoch)
        elif event in (Event.AFTER_LOAD, Event.FIT_START):
            averager.timestamp = state.timestamp.copy()
        elif event in (Event.BATCH_END, Event.EPOCH_END):
            if averager.schedule.counts(TimeUnit.TOKEN) and not state.timestamp.token:
                raise ValueError(
                    f"{self.name}: {averager.schedule.describe()} counts tokens, and the Trainer counts them only in "
                    "dict batches with 'attention_mask' or 'input_ids': give such batches, or a half-life in 'ba'/'sp'"
                )
            averager.timestamp = state.timestamp.copy()
            skipped = averager.num_skipped_nonfinite
            averager.tick(TimeUnit.BATCH if event == Event.BATCH_END else TimeUnit.EPOCH)
            if averager.num_skipped_nonfinite != skipped:
                logger.log_metrics(
                    {"ema/num_skipped_nonfinite": float(averager.num_skipped_nonfinite)},
                    step=state.timestamp.get(averager.update_interval.unit),
                )
            self._finish(state, end_of_training=False)
        elif event == Event.EVAL_START:
            if averager.started:
                averager.get_ema_model(state.model)
        else:  # EVAL_END, FIT_END, BATCH_START
            if event == Event.FIT_END:
                averager.wait()  # fit() returns a finished average
            if averager.ema_weights_active and averager.follows(state.model):
                if event == Event.BATCH_START:
                    warnings.warn(
                        "the averaged weights were still in the model at the start of a batch; training weights "
                        "restored (call averager.get_training_model(model) after using get_ema_model)",
                        stacklevel=2,
                    )
                averager.get_training_model(state.model)
            if event == Event.BATCH_START and isinstance(averager, SWA) and averager.swa_lr is not None:
                self._set_learning_rate(state, averager)
            if event == Event.FIT_END:
                self._finish(state, end_of_training=True)

    def _finish(self, state: State, end_of_training: bool) -> None:
        """The averager's window end: BatchNorm recomputed over the training data once it has closed."""
        model_loss = callable(getattr(unwrap_model(state.model), "loss", None))

        def forward(model: torch.nn.Module, batch: Any) -> None:
            batch = to_device(batch, state.device)
            model(batch if model_loss else split_pair(batch)[0])

        self.averager.finish_window(state.train_dataloader, state.model, forward, end_of_training=end_of_training)

    def _set_learning_rate(self, state: State, swa: SWA) -> None:
        """torch's SWALR inside the window: from the rates at ``swa_start`` to ``swa_lr`` over ``anneal_time``."""
        assert swa.swa_lr is not None
        if self._lr_start_batch is None:
            if not swa.schedule.start_due(state.timestamp, state.max_duration, state.batches_per_epoch):
                return
            self._lr_start_batch = state.timestamp.batch
            self._lr_base = [[float(g["lr"]) for g in opt.param_groups] for opt in state.optimizers]
        anneal = int(swa.anneal_time.value)
        if swa.anneal_time.unit == TimeUnit.EPOCH:
            if not state.batches_per_epoch:
                raise ValueError(f"anneal_time='{swa.anneal_time}' needs a train_dataloader with a length; give 'ba'")
            anneal *= state.batches_per_epoch
        done = 1.0 if anneal <= 0 else min(1.0, (state.timestamp.batch - self._lr_start_batch) / anneal)
        left = (1 + math.cos(math.pi * done)) / 2 if swa.anneal_strategy == "cos" else 1 - done
        for opt, bases in zip(state.optimizers, self._lr_base, strict=True):
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["lr"] = swa.swa_lr + (base - swa.swa_lr) * left

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = self.averager.state_dict()
        if isinstance(self.averager, SWA):
            state.update(swa_lr_start_batch=self._lr_start_batch, swa_lr_base=self._lr_base)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averager.load_state_dict(state)
        self._lr_start_batch = state.get("swa_lr_start_batch")
        self._lr_base = [list(bases) for bases in state.get("swa_lr_base", [])]

    def checkpoint_model_state(
        self, model_state: dict[str, Any], algorithm_state: dict[str, Any], publish: bool
    ) -> dict[str, Any]:
        training = self.averager.training_model_state(model_state)
        if not (publish and self.averager.started):
            return training
        # tied weights' other names too, so that restoring gives them the training value as well
        algorithm_state["training_weights"] = {key: training[key] for key in self.averager.tracked_keys(training)}
        return self.averager.published_model_state(training)

    def restore_model_state(self, model_state: dict[str, Any], algorithm_state: dict[str, Any]) -> dict[str, Any]:
        # a distributed checkpoint keeps one rank's replicated buffers (FSDP2's BatchNorm statistics): this rank's own
        own = own_training(algorithm_state)
        training = algorithm_state.get("training_weights")
        if training is None:
            return {**model_state, **own}
        if not isinstance(training, Mapping):
            raise ValueError(f"{self.name} state's 'training_weights' must be a dict of tensors")
        unknown = [n for n in training if n not in model_state]
        if unknown:
            raise ValueError(
                f"{self.name} state's training weights have a tensor {unknown[0]!r} the checkpoint's model lacks"
            )
        return {**model_state, **training, **own}
