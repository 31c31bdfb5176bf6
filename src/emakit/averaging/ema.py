"""The EMA of a model's weights: the one averager handed an exponential schedule.

:class:`EMA` checks its arguments, makes them into a :mod:`~emakit.averaging.schedules` object (a constant
smoothing from ``half_life`` or ``smoothing``, optionally warmed up, or ``sigma_rel`` power profiles) and hands it
to the :class:`~emakit.averaging.averager.Averager`, which does everything else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import final

import torch

from emakit.averaging.averager import Averager
from emakit.averaging.config import DEFAULT_HALF_LIFE, ema_schedule, parse_options
from emakit.averaging.momentum import check_schedule_argument
from emakit.averaging.schedules import Schedule
from emakit.averaging.selection import BufferPolicy, ParamSelection, parse_selection
from emakit.averaging.warmup import Warmup
from emakit.time import Time

__all__ = ["EMA"]


@final
class EMA(Averager):
    """Keep an exponential moving average of a model's trainable parameters and buffers.

    Every ``update_interval`` the average moves toward the training weights,
    ``ema = smoothing * ema + (1 - smoothing) * weights`` with ``smoothing = 2 ** (-update_interval / half_life)``,
    so a weight's contribution halves every ``half_life``. Integer buffers are copied, not averaged.

    In any loop::

        ema = EMA(half_life="2000ba")
        ema.attach(model)                      # max_duration=... only for 'dur' times
        for epoch in range(epochs):
            for batch in loader:
                ...; optimizer.step()
                ema.step()                     # counts one optimizer step; starts or blends when due
            ema.epoch_end()                    # only needed for 'ep' units
            with ema.average_parameters():     # the EMA weights, once started; always swapped back
                evaluate(model)
        torch.save(ema.state_dict(), path)     # everything for an exact resume

    Args:
        half_life: time for a contribution to halve, in ``'ba'`` (optimizer steps) or ``'ep'`` (default
            ``'1000ba'``). Give ``smoothing`` instead to set the coefficient directly. A list tracks one
            average per half-life, all updated in one pass over the weights. In ``'sp'`` or ``'tok'`` (data
            seen), each update weighs the samples or tokens seen since the previous one,
            ``smoothing = 2 ** (-seen / half_life)``: :meth:`step` must be told them (``num_samples``,
            ``num_tokens``), and the average's time scale holds when the batch size ramps.
        sigma_rel: instead of half-lives, power-function profiles (EDM2's post-hoc EMA): each average's
            width is a fixed fraction ``sigma_rel`` of the training so far, in (0, 1/sqrt(12)). One value or
            a list (one average each). See :mod:`emakit.posthoc`.
        smoothing: the per-update coefficient in [0, 1]; excludes an explicit ``half_life``.
        ema_start: when the average starts, as a copy of the weights: ``'ba'``, ``'ep'``, ``'sp'`` or
            ``'dur'`` (a fraction of ``max_duration`` in [0, 1]). Default ``'0.0dur'`` (the first update).
        update_interval: time between updates, in half_life's unit (default 1 of it, or ``'1ba'`` with
            ``smoothing``). An interval longer than the half-life is allowed but warns: the average then
            barely smooths.
        fp32_ema: keep the average of fp16/bf16 tensors in fp32 (default). A 16-bit average stops moving
            once ``1 - smoothing`` is below the dtype's resolution. What users receive as the EMA model
            (:attr:`ema_model`, published checkpoints, exports) is still in the model's dtype; the fp32
            master stays in this object's state, so resuming is exact.
        skip_nonfinite: before each update, check the training weights for NaN/Inf and skip the update
            (with a warning, counted in ``num_skipped_nonfinite``) if any is found.
        flatten_model: at :meth:`attach`, re-point the model's parameters and buffers as views into one
            buffer per (device, dtype) (:func:`emakit.engine.flatten.flatten_model_`), so that each update is one
            kernel per buffer. Off by default because it changes where the model's tensors live.
        overlap: run the parameters' part of each update alongside the next training step (CUDA side
            stream or CPU worker thread); see :mod:`emakit.engine.overlap`. Off by default; one average only.
        snapshot_interval: with ``snapshot_folder``, write every tracked average to the folder every this
            often (in the update unit), for post-hoc reconstruction of any other EMA length
            (:func:`emakit.posthoc.reconstruct`). Written after the update at that time, atomically.
        snapshot_folder: where snapshots go (``snapshot-000000.safetensors``, ...; DCP directories for
            sharded models).
        snapshot_dtype: dtype of the snapshots' floating tensors: ``torch.float32`` (default) or
            ``torch.float16`` / ``torch.bfloat16`` to halve the disk.
        snapshot_raw: also write the training weights into each snapshot, and the weights at the start
            (``theta_0``) into the first: one more model per snapshot, for the post-hoc kernels that weigh the raw
            weights (BEMA's; the raw weights as a sweep candidate). See docs/posthoc.md for the disk cost.
        eval_average: which tracked average :meth:`average_parameters`, :attr:`ema_model`, checkpoints
            and exports use (an index into the averages, default 0).
        params: the parameters averaged: ``'trainable'`` (default; those requiring grad when the average
            starts), ``'all'``, glob patterns on canonical names, or a callable ``(name, tensor) -> bool``.
        buffers: floating buffers ``'average'`` (default), ``'copy'`` or ``'share'`` (not kept), or
            ``{pattern: policy}``. What is not kept costs no memory and is shared with the model; see
            :mod:`emakit.averaging.selection`.
        warmup: ramp the smoothing up early as timm and diffusers do: True or ``Warmup(gamma, power)`` (:mod:`.warmup`).
        half_life_fraction: instead of half-lives, a half-life that grows with training: the fraction ``f`` of the
            updates since the start (torchtitan's name), ``smoothing_n = 2 ** (-1 / (f * n))`` at the update that
            brings the average to ``n`` models. Close to the power profile ``gamma = ln 2 / f - 1`` (``sigma_rel``);
            see docs/posthoc.md. One value or a list (one average each).
        schedule: instead of the timing arguments above, a schedule object, e.g. a teacher's momentum ramp
            (:class:`~emakit.averaging.momentum.CosineMomentum`, :class:`~emakit.averaging.momentum.MomentumFunction`);
            it excludes ``half_life``, ``smoothing``, ``sigma_rel``, ``ema_start``, ``update_interval``, ``warmup`` and ``half_life_fraction``.

    The arguments become a :mod:`~emakit.averaging.schedules` object (:attr:`schedule`: :class:`~.schedules.Constant`,
    :class:`~.schedules.Power`, :class:`~.schedules.GrowingHalfLife` or :class:`~.schedules.PerAmount`) and the options every averager shares; all the verbs are
    :class:`~emakit.averaging.averager.Averager`'s.
    """

    def __init__(
        self,
        half_life: str | Time | Sequence[str | Time] | None = DEFAULT_HALF_LIFE,
        smoothing: float | None = None,
        ema_start: str | Time = "0.0dur",
        update_interval: str | Time | None = None,
        fp32_ema: bool = True,
        skip_nonfinite: bool = False,
        flatten_model: bool = False,
        overlap: bool = False,
        sigma_rel: float | Sequence[float] | None = None,
        snapshot_interval: str | Time | None = None,
        snapshot_folder: str | os.PathLike[str] | None = None,
        snapshot_dtype: torch.dtype = torch.float32,
        eval_average: int = 0,
        snapshot_raw: bool = False,
        params: ParamSelection = "trainable",
        buffers: BufferPolicy = "average",
        warmup: bool | Warmup = False,
        half_life_fraction: float | Sequence[float] | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        if schedule is None:
            schedule = ema_schedule(
                half_life,
                smoothing,
                sigma_rel,
                ema_start,
                update_interval,
                warmup,
                snapshot_folder,
                3,
                half_life_fraction,
            )
        else:
            if half_life_fraction is not None:
                raise ValueError(
                    f"give schedule or half_life_fraction, not both: got schedule={schedule!r} and "
                    f"half_life_fraction={half_life_fraction!r}"
                )
            schedule = check_schedule_argument(
                schedule,
                half_life=None if half_life is DEFAULT_HALF_LIFE else half_life,
                smoothing=smoothing,
                sigma_rel=sigma_rel,
                ema_start=None if ema_start == "0.0dur" else ema_start,
                update_interval=update_interval,
                warmup=warmup,
            )
        options = parse_options(
            schedule,
            fp32_ema=fp32_ema,
            skip_nonfinite=skip_nonfinite,
            flatten_model=flatten_model,
            overlap=overlap,
            snapshot_interval=snapshot_interval,
            snapshot_folder=snapshot_folder,
            snapshot_dtype=snapshot_dtype,
            snapshot_raw=snapshot_raw,
            eval_average=eval_average,
        )
        self._configure(schedule, options, parse_selection(params, buffers), bn_update=False)

    def __repr__(self) -> str:
        described = self.schedule.describe()
        smoothing = self.schedule.smoothing
        coefficient = "" if "smoothing=" in described or smoothing != smoothing else f", smoothing={smoothing:.6g}"
        return f"EMA({described}{coefficient})"
