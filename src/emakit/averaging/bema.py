"""BEMA: the one averager handed a bias-corrected EMA schedule (Block & Zhang, "EMA Without the Lag", 2025).

:class:`BEMA` checks the paper's arguments, makes them into a :class:`~emakit.averaging.schedules.BiasCorrected`
schedule and hands it to the :class:`~emakit.averaging.averager.Averager`; the correction of the evaluated weights
is :mod:`emakit.averaging.correction`'s.
"""

from __future__ import annotations

import math
from typing import final

from emakit.averaging.averager import Averager
from emakit.averaging.config import check_start, parse_options
from emakit.averaging.schedules import UPDATE_UNITS, BiasCorrected
from emakit.averaging.selection import BufferPolicy, ParamSelection, parse_selection
from emakit.time import Time

__all__ = ["BEMA"]


@final
class BEMA(Averager):
    """An EMA whose evaluated weights are corrected for its lag: BEMA.

    From the start (``bema_start``, the paper's burn-in ``tau``: the weights then are ``theta_0`` and the first
    average), every ``update_interval`` (``phi``) the average moves toward the training weights with weight
    ``beta_t = (rho + gamma * t) ** -kappa``, ``t`` counting the update unit since the start. What is evaluated,
    swapped in (:meth:`average_parameters`), published in checkpoints, exported and given as :attr:`ema_model`
    is ``alpha_t * (theta - theta_0) + EMA`` with ``alpha_t = (rho + gamma * t) ** -eta`` of the last update and
    ``theta`` the training weights at that moment (those of the last update when evaluated right after it, as
    trainers do). Defaults are the paper's (and TRL's ``BEMACallback``'s).

    In any loop::

        bema = BEMA(update_interval="400ba")
        bema.attach(model)
        for batch in loader:
            ...; optimizer.step()
            bema.step()
        with bema.average_parameters():        # the bias-corrected weights
            evaluate(model)

    Args:
        rho: the lag ``rho``, an offset of ``t`` that tempers the first updates (TRL's ``lag``), default 10.
        gamma: the multiplier ``gamma`` of ``t`` (TRL's ``multiplier``), default 1.
        kappa: the EMA power ``kappa`` (TRL's ``ema_power``), default 0.5; 0 makes the average the last weights.
        eta: the correction power ``eta`` (TRL's ``bias_power``), default 0.2; large values turn the correction off.
        update_interval: ``phi``, time between updates in ``'ba'`` or ``'ep'`` (default ``'400ba'``).
        bema_start: ``tau``, when ``theta_0`` and the average are taken, in any unit (default ``'0ba'``, the first step).
        fp32_ema: keep the average of fp16/bf16 tensors in fp32 (default). ``theta_0`` is an exact copy of the
            weights and is kept in the model's dtype.
        skip_nonfinite: as for :class:`~emakit.averaging.EMA`.
        flatten_model: as for :class:`~emakit.averaging.EMA`.
        params: as for :class:`~emakit.averaging.EMA`: what is averaged and corrected (LoRA adapters keep
            ``theta_0`` of the adapters only).
        buffers: as for :class:`~emakit.averaging.EMA`.
    """

    def __init__(
        self,
        rho: float = 10.0,
        gamma: float = 1.0,
        kappa: float = 0.5,
        eta: float = 0.2,
        update_interval: str | Time = "400ba",
        bema_start: str | Time = "0ba",
        fp32_ema: bool = True,
        skip_nonfinite: bool = False,
        flatten_model: bool = False,
        params: ParamSelection = "trainable",
        buffers: BufferPolicy = "average",
    ) -> None:
        for name, value in (("rho", rho), ("gamma", gamma), ("kappa", kappa), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number of 0 or more, got {value!r}")
        interval = Time.coerce(update_interval, "update_interval", UPDATE_UNITS, positive=True)
        schedule = BiasCorrected(
            float(rho), float(gamma), float(kappa), float(eta), interval, check_start(bema_start, "bema_start")
        )
        if schedule.elapsed(2) < 1 and kappa > 0:
            raise ValueError(
                f"rho + gamma * update_interval must be 1 or more (the first update's weight (rho + gamma * t) ** "
                f"-kappa would exceed 1), got rho={rho!r}, gamma={gamma!r}, update_interval='{interval}'"
            )
        options = parse_options(schedule, fp32_ema=fp32_ema, skip_nonfinite=skip_nonfinite, flatten_model=flatten_model)
        self._configure(schedule, options, parse_selection(params, buffers), bn_update=False)

    def __repr__(self) -> str:
        return f"BEMA({self.schedule.describe()})"
