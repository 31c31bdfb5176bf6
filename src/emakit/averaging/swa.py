"""Stochastic Weight Averaging: the one averager handed an equal-weight window.

:class:`SWA` checks its arguments and makes them into an :class:`~emakit.averaging.schedules.EqualWeights`
schedule: the window opens at ``swa_start`` (the average starts as a copy of the weights), each update of the
window enters with weight ``1 / n`` (so the average is the plain mean of the weights at every update), and it
closes after the update at ``swa_end`` or at the end of training. The
:class:`~emakit.averaging.averager.Averager` does everything else, recomputing BatchNorm statistics when the
window closes (:meth:`~emakit.averaging.averager.Averager.finish_window`). ``swa_lr``, ``anneal_time`` and
``anneal_strategy`` configure the learning rate emakit's Trainer sets inside the window.
"""

from __future__ import annotations

import math
from typing import final

from emakit.averaging.averager import Averager
from emakit.averaging.config import check_start, parse_options
from emakit.averaging.schedules import DURATION_UNITS, UPDATE_UNITS, EqualWeights
from emakit.averaging.selection import BufferPolicy, ParamSelection, parse_selection
from emakit.time import Time, TimeUnit

__all__ = ["SWA"]


@final
class SWA(Averager):
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
            closes (one pass over the training data, momentum None; :meth:`finish_window`). Default True.
        fp32_ema: keep the average of fp16/bf16 tensors in fp32 (default), as for :class:`~emakit.averaging.EMA`.
        skip_nonfinite: skip updates while the weights hold NaN/Inf, as for :class:`~emakit.averaging.EMA`.
        flatten_model: one buffer per (device, dtype) for the model, as for :class:`~emakit.averaging.EMA`.
        params: which parameters are averaged, as for :class:`~emakit.averaging.EMA`.
        buffers: what happens to floating buffers, as for :class:`~emakit.averaging.EMA`.

    The window is an :class:`~emakit.averaging.schedules.EqualWeights` schedule (:attr:`schedule`); all the verbs
    are :class:`~emakit.averaging.averager.Averager`'s.
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
        params: ParamSelection = "trainable",
        buffers: BufferPolicy = "average",
    ) -> None:
        interval = Time.coerce(update_interval, "update_interval", UPDATE_UNITS, positive=True)
        start = check_start(swa_start, "swa_start")
        end = None
        if swa_end is not None:
            end = Time.coerce(swa_end, "swa_end", (*DURATION_UNITS, TimeUnit.DURATION), positive=True)
            if end.unit == TimeUnit.DURATION and end.value > 1:
                raise ValueError(f"swa_end in 'dur' must be in (0, 1], got {str(end)!r}")
            if end.unit == start.unit and end < start:
                raise ValueError(f"swa_end='{end}' is before swa_start='{start}': the window would be empty")
            if end.unit != start.unit and TimeUnit.DURATION not in (start.unit, end.unit) and start.value > 0:
                raise ValueError(
                    f"swa_start='{start}' and swa_end='{end}' are in different units, so whether the window holds any "
                    "update depends on the epoch length: give both in the same unit (or one as a 'dur' fraction)"
                )
        if swa_lr is not None and (
            isinstance(swa_lr, bool) or not isinstance(swa_lr, (int, float)) or not math.isfinite(swa_lr) or swa_lr < 0
        ):
            raise ValueError(f"swa_lr must be a finite number of 0 or more, or None, got {swa_lr!r}")
        #: The learning rate emakit's Trainer sets in the window (torch's ``SWALR`` rule); None leaves it alone.
        self.swa_lr: float | None = None if swa_lr is None else float(swa_lr)
        self.anneal_time = Time.coerce(anneal_time, "anneal_time", UPDATE_UNITS)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        if not isinstance(update_bn, bool):
            raise TypeError(f"update_bn must be a bool, got {update_bn!r}")
        schedule = EqualWeights(interval, start, end)
        options = parse_options(schedule, fp32_ema=fp32_ema, skip_nonfinite=skip_nonfinite, flatten_model=flatten_model)
        self._configure(schedule, options, parse_selection(params, buffers), bn_update=update_bn)

    def __repr__(self) -> str:
        return f"SWA({self.schedule.describe()})"
