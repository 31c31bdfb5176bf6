"""Stochastic Weight Averaging: the equal-weight average of the weights over a window, driven by any loop.

:class:`SWA` is the EMA's sibling on the same engine and verbs (``attach``, ``step``, ``epoch_end``,
``average_parameters``, ``ema_model``, ``state_dict`` / ``load_state_dict``, exports). Only the weight of
each update differs: the ``n``-th model of the window enters with ``1 / n`` (the engine's lerp), so the
average is the plain mean of the weights at every update of the window. The window opens at ``swa_start``
(the average starts as a copy of the weights) and closes after the update at ``swa_end``; after it the
average no longer moves, and :meth:`SWA.update_bn` recomputes its BatchNorm statistics from training
data (the averaged weights' own statistics, which averaging the running statistics does not give).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from emakit.averaging.clock import DURATION_UNITS
from emakit.averaging.config import UPDATE_UNITS
from emakit.averaging.ema import EMA
from emakit.posthoc.profiles import PowerProfile
from emakit.time import Time, TimeUnit, reached

__all__ = ["SWA", "default_bn_forward"]


def default_bn_forward(model: nn.Module, batch: Any) -> None:
    """Run ``model`` on a batch as torch's ``update_bn`` does: the first element of a list or tuple."""
    inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
    device = next((t.device for t in model.parameters()), None)
    if device is not None and isinstance(inputs, torch.Tensor):
        inputs = inputs.to(device)
    model(inputs)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class SWA(EMA):
    """Keep the equal-weight average of a model's trainable parameters and buffers over a window of training.

    In any loop::

        swa = SWA(swa_start="0.75dur", update_interval="1ep")
        swa.attach(model, max_duration="20ep")
        for epoch in range(20):
            for batch in loader:
                ...; optimizer.step()
                swa.step()
            swa.epoch_end()                        # opens the window, averages, closes it
        swa.update_bn(loader)                      # BatchNorm statistics of the averaged weights
        with swa.average_parameters():
            evaluate(model)

    Args:
        swa_start: when the window opens (the average starts as a copy of the weights): ``'ba'``, ``'ep'``,
            ``'sp'`` or ``'dur'`` (a fraction of ``max_duration``). Default ``'0.75dur'``.
        swa_end: when it closes, after that update: same units; default None, the end of training.
        update_interval: time between updates, ``'ba'`` or ``'ep'`` (default ``'1ep'``, as torch's and
            Lightning's SWA).
        swa_lr: the learning rate emakit's Trainer sets in the window (as torch's ``SWALR``): from the
            optimizer's rate at ``swa_start`` to ``swa_lr`` over ``anneal_time``, then constant. None (default):
            the learning rate is left alone. In your own loop use ``torch.optim.swa_utils.SWALR``.
        anneal_time: how long the rate takes to reach ``swa_lr``, ``'ba'`` or ``'ep'`` (default ``'1ep'``);
            ``'0ba'`` sets ``swa_lr`` at once (a constant schedule).
        anneal_strategy: ``'cos'`` (default) or ``'linear'``.
        update_bn: whether emakit's Trainer and the callbacks recompute BatchNorm statistics when the window
            closes (one pass over the training data, momentum None). Default True.
        fp32_ema: keep the average of fp16/bf16 tensors in fp32 (default), as for :class:`~emakit.averaging.EMA`.
        skip_nonfinite: skip updates while the weights hold NaN/Inf, as for :class:`~emakit.averaging.EMA`.
        flatten_model: one buffer per (device, dtype) for the model, as for :class:`~emakit.averaging.EMA`.
    """

    def __init__(
        self,
        swa_start: str | Time = "0.75dur",
        swa_end: str | Time | None = None,
        update_interval: str | Time = "1ep",
        swa_lr: float | None = None,
        anneal_time: str | Time = "1ep",
        anneal_strategy: str = "cos",
        update_bn: bool = True,
        fp32_ema: bool = True,
        skip_nonfinite: bool = False,
        flatten_model: bool = False,
    ) -> None:
        interval = Time.coerce(update_interval, "update_interval", UPDATE_UNITS, positive=True)
        start = Time.coerce(swa_start, "swa_start")
        if start.unit == TimeUnit.DURATION and start.value > 1:
            raise ValueError(f"swa_start in 'dur' must be in [0, 1], got {str(start)!r}")
        super().__init__(
            half_life=None,
            smoothing=0.0,  # unused: every update's weight is 1/n (see _update_weights)
            ema_start=start,
            update_interval=interval,
            fp32_ema=fp32_ema,
            skip_nonfinite=skip_nonfinite,
            flatten_model=flatten_model,
        )
        self.smoothing = math.nan
        self.smoothings = [None]
        self.profiles = [PowerProfile(0.0)]  # the uniform profile: the t-th update enters with weight 1 / t
        self.swa_end: Time | None = None
        if swa_end is not None:
            self.swa_end = Time.coerce(swa_end, "swa_end", (*DURATION_UNITS, TimeUnit.DURATION), positive=True)
            if self.swa_end.unit == TimeUnit.DURATION and self.swa_end.value > 1:
                raise ValueError(f"swa_end in 'dur' must be in (0, 1], got {str(self.swa_end)!r}")
            if self.swa_end.unit == self.ema_start.unit and self.swa_end < self.ema_start:
                raise ValueError(
                    f"swa_end='{self.swa_end}' is before swa_start='{self.ema_start}': the window would be empty"
                )
        if swa_lr is not None and (
            isinstance(swa_lr, bool) or not isinstance(swa_lr, (int, float)) or not math.isfinite(swa_lr) or swa_lr < 0
        ):
            raise ValueError(f"swa_lr must be a finite number of 0 or more, or None, got {swa_lr!r}")
        self.swa_lr: float | None = None if swa_lr is None else float(swa_lr)
        self.anneal_time = Time.coerce(anneal_time, "anneal_time", UPDATE_UNITS)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        if not isinstance(update_bn, bool):
            raise TypeError(f"update_bn must be a bool, got {update_bn!r}")
        self.bn_update = update_bn
        #: Whether the window has closed (the average no longer moves) and BatchNorm was recomputed since.
        self.window_closed = False
        self.bn_updated = False
        #: emakit's Trainer's ``swa_lr`` schedule: the batch it began at and each optimizer's group rates then.
        self.lr_start_batch: int | None = None
        self.lr_base: list[list[float]] = []

    @property
    def swa_start(self) -> Time:
        """When the window opens (the EMA's ``ema_start``)."""
        return self.ema_start

    def __repr__(self) -> str:
        end = "None" if self.swa_end is None else f"'{self.swa_end}'"
        return f"SWA(swa_start='{self.ema_start}', swa_end={end}, update_interval='{self.update_interval}')"

    def require_started(self) -> None:
        """Raise RuntimeError, saying when the window opens, unless it has."""
        if not self.started:
            unit = "batch end (optimizer step)" if self.update_interval.unit == TimeUnit.BATCH else "epoch end"
            raise RuntimeError(
                f"the SWA window has not opened yet: the average starts as a copy of the weights at the first {unit} "
                f"where training progress reaches swa_start='{self.ema_start}'"
            )

    def tick(self, unit: TimeUnit) -> bool:
        """Open, average or close the window if due at the clock's current time in ``unit``."""
        if unit != self.update_interval.unit or self.window_closed:
            return False
        changed = super().tick(unit)
        if self.started and self.swa_end is not None and self.end_reached():
            self.window_closed = True
        return changed

    def end_reached(self) -> bool:
        """Whether training progress has reached ``swa_end`` (never for ``swa_end=None``)."""
        if self.swa_end is None:
            return False
        if self.swa_end.unit == TimeUnit.DURATION and self.max_duration is None:
            raise ValueError(
                f"swa_end='{self.swa_end}' is a fraction of the training length, which this SWA was not told: "
                "pass max_duration to swa.attach(model, max_duration=...)"
            )
        return reached(self.timestamp, self.swa_end, self.max_duration, self.batches_per_epoch)

    def close_window(self) -> None:
        """Stop averaging now (the end of training closes a window without ``swa_end``)."""
        self.window_closed = True

    @torch.no_grad()
    def update_bn(
        self,
        loader: Iterable[Any],
        model: nn.Module | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        """Recompute the average's BatchNorm statistics: one pass of the averaged weights over ``loader``.

        As ``torch.optim.swa_utils.update_bn``: the running statistics are reset and accumulated with
        momentum None (an equal-weight mean over the batches), the model in train mode. The result is
        stored in the average, so evaluation, ``ema_model``, checkpoints and exports all use it; the
        training weights are left as they were. ``forward(model, batch)`` runs a batch (default: the
        model on the batch's first element when it is a list or tuple, else on the batch).
        """
        self.require_started()
        target = self.model if model is None else model
        norms = _batch_norms(target)
        if not norms:
            self.bn_updated = True
            return
        run = default_bn_forward if forward is None else forward
        with self.average_parameters(target):
            momenta = [m.momentum for m in norms]
            was_training = target.training
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            target.train()
            try:
                for batch in loader:
                    run(target, batch)
            finally:
                for m, momentum in zip(norms, momenta, strict=True):
                    m.momentum = momentum
                target.train(was_training)
            self._store_batch_norm(target, norms)
        self.bn_updated = True
        self._version += 1

    def _store_batch_norm(self, model: nn.Module, norms: list[nn.modules.batchnorm._BatchNorm]) -> None:
        """Copy the BatchNorm buffers the model holds now into the average."""
        assert self._storage is not None
        buffers = {id(b) for m in norms for b in m.buffers(recurse=False)}
        average = self._storage.state_dict()
        for name, live in zip(self._tracked.names, self._tracked.live(model), strict=True):
            if id(live) in buffers:
                average[name].copy_(live)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state plus where the window stands."""
        return {**super().state_dict(), "swa_window_closed": self.window_closed, "swa_bn_updated": self.bn_updated}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`)."""
        super().load_state_dict(state)
        self.window_closed = bool(state.get("swa_window_closed", False))
        self.bn_updated = bool(state.get("swa_bn_updated", False))
