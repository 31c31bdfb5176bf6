"""The EMA's schedule on its clock: when the average starts, when it blends, and with what weight.

The clock itself is a :class:`~emakit.time.Timestamp` the EMA advances (or a trainer sets); these are the
questions asked of it, as functions of the settings and the time, so that the schedule is read in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

from emakit.averaging.warmup import Warmup, warmed_weights
from emakit.posthoc.profiles import PowerProfile, Profile, power_beta
from emakit.time import Time, Timestamp, TimeUnit, reached

__all__ = ["DURATION_UNITS", "check_batches_per_epoch", "check_duration", "start_due", "update_due", "update_weights"]

DURATION_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE)


def start_due(ema_start: Time, timestamp: Timestamp, max_duration: Time | None, batches_per_epoch: int | None) -> bool:
    """Whether training progress has reached ``ema_start`` (a ``'dur'`` start needs ``max_duration``)."""
    if ema_start.unit == TimeUnit.DURATION and max_duration is None:
        if ema_start.value == 0:
            return True
        raise ValueError(
            f"ema_start='{ema_start}' is a fraction of the training length, which this EMA was not told: "
            "pass max_duration to ema.attach(model, max_duration=...) or ema.set_duration(...)"
        )
    return reached(timestamp, ema_start, max_duration, batches_per_epoch)


def update_due(count: int, interval: Time | None) -> bool:
    """Whether ``count`` (in the interval's unit) falls on ``interval``; never for no interval."""
    return interval is not None and count % int(interval.value) == 0


def update_weights(
    smoothings: Sequence[float | None], profiles: Sequence[Profile], t: int, warmup: Warmup | None = None
) -> list[float]:
    """``1 - beta`` of every average for update number ``t`` (1-based, counting the start, a copy, as update 1).

    A constant ``smoothing`` gives a constant weight (its smoothing capped by the ``warmup`` ramp, if any); a
    power profile (``smoothing`` None) a weight that shrinks with ``t``.
    """
    weights = []
    for j, smoothing in enumerate(smoothings):
        if smoothing is None:
            profile = profiles[j]
            assert isinstance(profile, PowerProfile)
            weights.append(1.0 - power_beta(t, profile.gamma))
        else:
            weights.append(1.0 - smoothing)
    return warmed_weights(weights, warmup, t)


def check_duration(max_duration: str | Time, ema_start: Time) -> Time:
    """``max_duration`` parsed, if positive and not before ``ema_start`` (else the EMA would never start)."""
    duration = Time.coerce(max_duration, "max_duration", DURATION_UNITS, positive=True)
    if duration.value <= 0:
        raise ValueError(f"max_duration must be greater than 0, got {str(duration)!r}")
    if ema_start.unit == duration.unit and ema_start > duration:
        raise ValueError(f"ema_start='{ema_start}' is after max_duration='{duration}': the EMA would never start")
    return duration


def check_batches_per_epoch(batches_per_epoch: object) -> int:
    """``batches_per_epoch`` if it is a non-negative int."""
    if isinstance(batches_per_epoch, bool) or not isinstance(batches_per_epoch, int) or batches_per_epoch < 0:
        raise ValueError(f"batches_per_epoch must be a non-negative int or None, got {batches_per_epoch!r}")
    return batches_per_epoch
