"""What varies between averagers: the schedule, one pure object per averaging rule.

A schedule answers every "when" and "how much" question of an average, and nothing else:

- when it starts (as a copy of the weights): :meth:`Schedule.start_due`, at ``start``;
- when it updates: :meth:`Schedule.update_due`, every ``update_interval`` (``'ba'`` or ``'ep'``);
- with what weight: :meth:`Schedule.weights` gives, for the update after which the average holds ``n`` models
  (``n = 1`` is the start), each tracked average's weight of the training weights, ``1 - beta_n``:
  ``average <- beta_n * average + (1 - beta_n) * weights``;
- when it stops moving: :meth:`Schedule.end_reached` (``end``), and whether the end of training closes it.

The averager (:class:`~emakit.averaging.averager.Averager`) keeps the clock and the count ``n`` (saved in its
state), asks its schedule, and runs the blend. EMA and SWA are averagers handed different schedules:

=====================  =================================================================================
:class:`Constant`      EMA with a constant per-update smoothing (``half_life`` or ``smoothing``; several
                       at once), optionally capped early by a :class:`~emakit.averaging.warmup.Warmup`
:class:`Power`         EDM2's power-function profiles (``sigma_rel``): ``beta_n = (1 - 1/n) ** (gamma + 1)``
:class:`EqualWeights`  SWA: the plain mean over a window, ``beta_n = 1 - 1/n``
=====================  =================================================================================
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, final

from emakit.averaging.warmup import Warmup
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile, Profile, power_beta
from emakit.time import Time, Timestamp, TimeUnit, reached

__all__ = [
    "DURATION_UNITS",
    "UPDATE_UNITS",
    "Constant",
    "EqualWeights",
    "Power",
    "Schedule",
    "check_batches_per_epoch",
    "check_duration",
]

#: Units of ``update_interval`` (and of a half-life): optimizer steps or epochs.
UPDATE_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH)
#: Units a training length (``max_duration``) can be given in.
DURATION_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE)


class Schedule(ABC):
    """When an average starts, updates and stops, and the weight of each update (abstract; see the module).

    Concrete schedules are frozen dataclasses with the fields ``update_interval``, ``start`` and ``end``;
    ``start_argument`` and ``end_argument`` are the names users gave them (for messages).
    """

    update_interval: Time
    start: Time
    end: Time | None
    start_argument: ClassVar[str] = "ema_start"
    end_argument: ClassVar[str] = "end"
    #: Whether the end of training closes the window (SWA's mean is final then; an EMA goes on).
    closes_at_end_of_training: ClassVar[bool] = False
    #: The messages that name the averager, as templates (``EMA`` and ``ema.attach`` here, ``SWA`` for SWA's).
    averager_name: ClassVar[str] = "EMA"
    not_started_template: ClassVar[str] = (
        "the EMA has not started yet: it starts as a copy of the weights at the first {unit} where training "
        "progress reaches {argument}='{time}'"
    )
    no_length_template: ClassVar[str] = (
        "{argument}='{time}' is a fraction of the training length, which this EMA was not told: pass max_duration "
        "to ema.attach(model, max_duration=...) or ema.set_duration(...)"
    )
    never_starts_template: ClassVar[str] = (
        "{argument}='{time}' is after max_duration='{duration}': the EMA would never start"
    )

    @property
    @abstractmethod
    def num_averages(self) -> int:
        """How many averages this schedule tracks (each gets its own weight at every update)."""

    @abstractmethod
    def weights(self, n: int) -> list[float]:
        """Each average's weight ``1 - beta_n`` of the training weights at the update that brings it to ``n`` models."""

    @property
    @abstractmethod
    def profiles(self) -> list[Profile]:
        """Each average's weighting of the past (post-hoc snapshots record these); empty if not representable."""

    @property
    @abstractmethod
    def smoothing(self) -> float:
        """The first average's constant coefficient ``beta``, NaN when it changes with ``n`` (saved in states)."""

    @abstractmethod
    def describe(self) -> str:
        """The averaging as the user gave it, e.g. ``half_life='20ba'``."""

    # ------------------------------------------------------------------ timing, shared by every schedule
    def start_due(self, timestamp: Timestamp, max_duration: Time | None, batches_per_epoch: int | None) -> bool:
        """Whether training progress has reached ``start`` (a ``'dur'`` start needs ``max_duration``)."""
        if self.start.unit == TimeUnit.DURATION and max_duration is None:
            if self.start.value == 0:
                return True
            raise ValueError(self.no_length_template.format(argument=self.start_argument, time=self.start))
        return reached(timestamp, self.start, max_duration, batches_per_epoch)

    def update_due(self, count: int) -> bool:
        """Whether ``count`` (in the update interval's unit) falls on ``update_interval``."""
        return count % int(self.update_interval.value) == 0

    def end_reached(self, timestamp: Timestamp, max_duration: Time | None, batches_per_epoch: int | None) -> bool:
        """Whether training progress has reached ``end`` (never without one)."""
        if self.end is None:
            return False
        if self.end.unit == TimeUnit.DURATION and max_duration is None:
            raise ValueError(self.no_length_template.format(argument=self.end_argument, time=self.end))
        return reached(timestamp, self.end, max_duration, batches_per_epoch)

    def counts_samples(self) -> bool:
        """Whether a start or end is in samples: :meth:`~emakit.averaging.averager.Averager.step` must be told them."""
        return self.start.unit == TimeUnit.SAMPLE or (self.end is not None and self.end.unit == TimeUnit.SAMPLE)

    def not_started_message(self) -> str:
        """Why the average is not there yet, and when it will be."""
        unit = "batch end (optimizer step)" if self.update_interval.unit == TimeUnit.BATCH else "epoch end"
        return self.not_started_template.format(unit=unit, argument=self.start_argument, time=self.start)


@final
@dataclass(frozen=True)
class Constant(Schedule):
    """One or more EMAs of constant per-update smoothing (``half_life`` or ``smoothing``), optionally warmed up.

    ``smoothings[j]`` is average ``j``'s ``beta``; ``half_lives`` are the half-lives it was derived from (empty
    when ``smoothing`` was given). With ``warmup`` the smoothing of blend ``s`` (``s = n - 1``) is capped at
    ``warmup.smoothing(s)``, timm's and diffusers' ramp.
    """

    smoothings: tuple[float, ...]
    update_interval: Time
    start: Time
    half_lives: tuple[Time, ...] = ()
    warmup: Warmup | None = None
    end: Time | None = None

    @property
    def num_averages(self) -> int:
        return len(self.smoothings)

    def weights(self, n: int) -> list[float]:
        if self.warmup is None:
            return [1.0 - s for s in self.smoothings]
        cap = self.warmup.smoothing(n - 1)
        return [1.0 - min(s, cap) for s in self.smoothings]

    @property
    def profiles(self) -> list[Profile]:
        if self.half_lives:
            return [HalfLifeProfile(h.value / self.update_interval.value) for h in self.half_lives]
        return [HalfLifeProfile(-1.0 / math.log2(s)) for s in self.smoothings if 0 < s < 1]

    @property
    def smoothing(self) -> float:
        return self.smoothings[0]

    def describe(self) -> str:
        if len(self.half_lives) > 1:
            timing = f"half_life={[str(h) for h in self.half_lives]}"
        elif self.half_lives:
            timing = f"half_life='{self.half_lives[0]}'"
        else:
            timing = f"smoothing={self.smoothings[0]}"
        warm = f", warmup={self.warmup!r}" if self.warmup is not None else ""
        return f"{timing}, update_interval='{self.update_interval}', ema_start='{self.start}'{warm}"


@final
@dataclass(frozen=True)
class Power(Schedule):
    """EDM2's power-function profiles, one average per ``gamma``: ``beta_n = (1 - 1/n) ** (gamma + 1)``.

    Each average's width stays the fraction ``sigma_rel`` of the training so far (a half-life that grows with
    training); see :mod:`emakit.posthoc.profiles`.
    """

    gammas: tuple[float, ...]
    update_interval: Time
    start: Time
    end: Time | None = None

    @property
    def num_averages(self) -> int:
        return len(self.gammas)

    def weights(self, n: int) -> list[float]:
        return [1.0 - power_beta(n, gamma) for gamma in self.gammas]

    @property
    def profiles(self) -> list[Profile]:
        return [PowerProfile(gamma) for gamma in self.gammas]

    @property
    def smoothing(self) -> float:
        return math.nan

    def describe(self) -> str:
        shown = [round(PowerProfile(g).sigma_rel, 6) for g in self.gammas]
        return f"sigma_rel={shown}, update_interval='{self.update_interval}', ema_start='{self.start}'"


@final
@dataclass(frozen=True)
class EqualWeights(Schedule):
    """SWA: every update of the window weighs the same, ``beta_n = 1 - 1/n``; the window closes after the
    update at ``end`` (or at the end of training)."""

    update_interval: Time
    start: Time
    end: Time | None = None
    start_argument: ClassVar[str] = "swa_start"
    end_argument: ClassVar[str] = "swa_end"
    closes_at_end_of_training: ClassVar[bool] = True
    averager_name: ClassVar[str] = "SWA"
    not_started_template: ClassVar[str] = (
        "the SWA window has not opened yet: the average starts as a copy of the weights at the first {unit} where "
        "training progress reaches {argument}='{time}'"
    )
    no_length_template: ClassVar[str] = (
        "{argument}='{time}' is a fraction of the training length, which this SWA was not told: pass max_duration "
        "to swa.attach(model, max_duration=...)"
    )
    never_starts_template: ClassVar[str] = (
        "{argument}='{time}' is after max_duration='{duration}': the SWA window would never open"
    )

    @property
    def num_averages(self) -> int:
        return 1

    def weights(self, n: int) -> list[float]:
        return [1.0 / n]

    @property
    def profiles(self) -> list[Profile]:
        return [PowerProfile(0.0)]  # gamma 0: the uniform profile

    @property
    def smoothing(self) -> float:
        return math.nan

    def describe(self) -> str:
        end = "None" if self.end is None else f"'{self.end}'"
        return f"swa_start='{self.start}', swa_end={end}, update_interval='{self.update_interval}'"


def check_duration(max_duration: str | Time, schedule: Schedule) -> Time:
    """``max_duration`` parsed, if positive and not before the schedule's start (else it would never start)."""
    duration = Time.coerce(max_duration, "max_duration", DURATION_UNITS, positive=True)
    if duration.value <= 0:
        raise ValueError(f"max_duration must be greater than 0, got {str(duration)!r}")
    if schedule.start.unit == duration.unit and schedule.start > duration:
        raise ValueError(
            schedule.never_starts_template.format(
                argument=schedule.start_argument, time=schedule.start, duration=duration
            )
        )
    return duration


def check_batches_per_epoch(batches_per_epoch: object) -> int:
    """``batches_per_epoch`` if it is a non-negative int."""
    if isinstance(batches_per_epoch, bool) or not isinstance(batches_per_epoch, int) or batches_per_epoch < 0:
        raise ValueError(f"batches_per_epoch must be a non-negative int or None, got {batches_per_epoch!r}")
    return batches_per_epoch
