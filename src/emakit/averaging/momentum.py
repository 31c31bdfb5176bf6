"""Teacher momentum schedules: the EMA of self-distillation (BYOL, DINO) and target networks, where the
smoothing ("momentum") itself follows a schedule over training.

Both are final :class:`~emakit.averaging.schedules.Schedule` classes, pure in the update count ``n`` (the averager
saves ``n``, so a resumed run continues the ramp exactly). Blend ``i = n - 2`` (0-based: ``n = 2`` is the first
blend after the start copy) uses the momentum ``m_i``, ``teacher <- m_i * teacher + (1 - m_i) * student``:

- :class:`CosineMomentum` (BYOL, DINO): ``m_i = final - (final - base) * (1 + cos(pi * min(i, K) / K)) / 2``,
  from ``base`` at the first blend to ``final`` after ``K`` blends. ``K`` is ``total_updates`` if given, else the
  number of updates in the training length, learned from ``max_duration`` (``ema.attach(model,
  max_duration=...)``, ``ema.set_duration``, or the Lightning / Transformers callbacks) by :func:`with_length`.
- :class:`MomentumFunction`: ``m_i = fn(i)``, any per-blend rule (a precomputed list's ``__getitem__`` works).

``EMA(schedule=...)`` takes either (:func:`check_schedule_argument`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, final

from emakit.averaging.config import check_start
from emakit.averaging.schedules import Schedule
from emakit.posthoc.profiles import Profile
from emakit.time import Time, TimeUnit

__all__ = ["CosineMomentum", "MomentumFunction", "MomentumSchedule", "check_schedule_argument", "with_length"]

_UPDATE_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH)


def _timing(schedule: Any, update_interval: str | Time, start: str | Time, end: str | Time | None) -> None:
    """Parse the timing fields of a frozen momentum schedule in place (they may be given as strings)."""
    interval = Time.coerce(update_interval, "update_interval", _UPDATE_UNITS, positive=True)
    if interval.value <= 0:
        raise ValueError(f"update_interval must be greater than 0, got {str(interval)!r}")
    object.__setattr__(schedule, "update_interval", interval)
    object.__setattr__(schedule, "start", check_start(start, "ema_start"))
    if end is not None:
        object.__setattr__(schedule, "end", check_start(end, "end"))


def _momentum(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{argument} must be a momentum in [0, 1], got {value!r}")
    return float(value)


class MomentumSchedule(Schedule):
    """A teacher's momentum rule (abstract): one average, whose smoothing changes with ``n`` and whose weighting
    of the past is no post-hoc profile."""

    @property
    def num_averages(self) -> int:
        return 1

    @property
    def profiles(self) -> list[Profile]:
        return []

    @property
    def smoothing(self) -> float:
        return math.nan


@final
@dataclass(frozen=True)
class CosineMomentum(MomentumSchedule):
    """The momentum of BYOL and DINO: from ``base`` to ``final`` along a half cosine over ``K`` blends.

    Args:
        base: the momentum of the first blend (DINO: 0.996, BYOL: 0.99).
        final: the momentum after ``K`` blends (1.0: the teacher freezes at the end of training).
        update_interval: time between blends, ``'ba'`` or ``'ep'`` (default ``'1ba'``).
        start: when the teacher starts as a copy of the student (``ema_start``; default ``'0.0dur'``).
        end: when the teacher stops moving (default never).
        total_updates: ``K``; default: the training length over ``update_interval``, learned from
            ``max_duration``. A blend with neither raises ValueError saying what to pass.
    """

    base: float = 0.996
    final: float = 1.0
    update_interval: Time = "1ba"  # type: ignore[assignment]
    start: Time = "0.0dur"  # type: ignore[assignment]
    end: Time | None = None
    total_updates: int | None = None
    #: ``K`` learned from ``max_duration`` (:func:`with_length`); ``total_updates`` wins when given.
    learned_updates: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", _momentum(self.base, "base"))
        object.__setattr__(self, "final", _momentum(self.final, "final"))
        total = self.total_updates
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"total_updates must be a positive int or None, got {total!r}")
        _timing(self, self.update_interval, self.start, self.end)

    def weights(self, n: int) -> list[float]:
        total = self.total_updates if self.total_updates is not None else self.learned_updates
        if total is None:
            raise ValueError(
                "CosineMomentum ramps over the training length, which this EMA was not told: pass max_duration in "
                "'ba' or 'ep' (ema.attach(model, max_duration=...) or ema.set_duration(...); an 'ep' length with a "
                "'ba' update_interval also needs batches_per_epoch), or CosineMomentum(total_updates=...)"
            )
        progress = min(max(n - 2, 0), total) / total
        momentum = self.final - (self.final - self.base) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return [1.0 - momentum]

    def describe(self) -> str:
        total = "" if self.total_updates is None else f", total_updates={self.total_updates}"
        return (
            f"schedule=CosineMomentum(base={self.base}, final={self.final}{total}), "
            f"update_interval='{self.update_interval}', ema_start='{self.start}'"
        )


@final
@dataclass(frozen=True)
class MomentumFunction(MomentumSchedule):
    """Any per-blend momentum: blend ``i`` (0-based) uses ``fn(i)``, a float in [0, 1].

    ``fn`` must be pure in ``i`` for a resumed run to continue exactly (a list's ``__getitem__`` is).
    """

    fn: Callable[[int], float]
    update_interval: Time = "1ba"  # type: ignore[assignment]
    start: Time = "0.0dur"  # type: ignore[assignment]
    end: Time | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"fn must be a callable (blend index -> momentum), got {type(self.fn).__name__}")
        _timing(self, self.update_interval, self.start, self.end)

    def weights(self, n: int) -> list[float]:
        return [1.0 - _momentum(self.fn(max(n - 2, 0)), f"fn({max(n - 2, 0)})")]

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"schedule=MomentumFunction({name}), update_interval='{self.update_interval}', ema_start='{self.start}'"


def with_length(schedule: Schedule, max_duration: Time | None, batches_per_epoch: int | None) -> Schedule:
    """``schedule`` told the training length: a :class:`CosineMomentum` learns its ``K``; others are unchanged."""
    if not isinstance(schedule, CosineMomentum) or max_duration is None:
        return schedule
    interval = schedule.update_interval
    length = max_duration.value
    if max_duration.unit != interval.unit:
        if batches_per_epoch is None or max_duration.unit == TimeUnit.SAMPLE:
            return schedule  # not known yet: a blend says what is missing
        length = length * batches_per_epoch if max_duration.unit == TimeUnit.EPOCH else length / batches_per_epoch
    total = int(length // interval.value)
    return replace(schedule, learned_updates=max(total, 1))


def check_schedule_argument(schedule: object, **given: object) -> Schedule:
    """``schedule`` if it is a :class:`Schedule` and no argument in ``given`` (the EMA's other timing arguments,
    ``None`` or ``False`` when not given) competes with it; TypeError or ValueError otherwise."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be an emakit Schedule (e.g. CosineMomentum()), got {type(schedule).__name__}")
    clashing = [f"{name}={value!r}" for name, value in given.items() if value is not None and value is not False]
    if clashing:
        raise ValueError(
            f"schedule= sets the whole averaging (timing included); it excludes {', '.join(clashing)}: "
            "give update_interval, ema_start and end to the schedule itself"
        )
    return schedule
