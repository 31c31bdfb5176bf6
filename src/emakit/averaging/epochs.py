"""The clock checks of :meth:`~emakit.averaging.averager.Averager.step`: what a step must be told, and whether
the loop ends its epochs.

A schedule with an ``'ep'`` time (``update_interval``, its start or its end) moves only at
:meth:`~emakit.averaging.averager.Averager.epoch_end`: a loop that never calls it would never start, update or
close the average, silently. Once ``batches_per_epoch`` is known, the step that would run past an epoch with no
epoch end is refused; otherwise the first verb that needs the average says that no epoch has ended.
"""

from __future__ import annotations

from emakit.averaging.rulestate import check_amounts
from emakit.averaging.schedules import Schedule
from emakit.time import Time, Timestamp, TimeUnit

__all__ = ["check_step", "epoch_settings", "not_started_hint"]


def epoch_settings(schedule: Schedule) -> list[str]:
    """The schedule's settings in epochs, as the user named them (``"update_interval='1ep'"``)."""
    named: list[tuple[str, Time | None]] = [
        ("update_interval", schedule.update_interval),
        (schedule.start_argument, schedule.start),
        (schedule.end_argument, schedule.end),
    ]
    return [f"{name}={str(time)!r}" for name, time in named if time is not None and time.unit == TimeUnit.EPOCH]


def check_step(
    name: str, schedule: Schedule, timestamp: Timestamp, batches_per_epoch: int | None, samples: int, tokens: int
) -> None:
    """Before a step is counted: refuse one a ``'sp'``/``'tok'`` time cannot use (no amount given), or one past an
    epoch with no epoch end under an ``'ep'`` schedule."""
    check_amounts(schedule, name, num_samples=samples, num_tokens=tokens)
    settings = epoch_settings(schedule)
    if settings and batches_per_epoch and timestamp.batch_in_epoch >= batches_per_epoch:
        raise RuntimeError(
            f"{name}: step() counted {timestamp.batch_in_epoch} optimizer steps since the last epoch end, and "
            f"batches_per_epoch={batches_per_epoch}: {', '.join(settings)} is in 'ep' units, which move only at "
            f"an epoch end: call {name.lower()}.epoch_end() after each epoch (or give the times in 'ba')"
        )


def not_started_hint(name: str, schedule: Schedule, timestamp: Timestamp) -> str:
    """What to add to the not-started message when steps were counted but no epoch ended; empty otherwise."""
    settings = epoch_settings(schedule)
    if not settings or timestamp.epoch > 0 or timestamp.batch == 0:
        return ""
    return (
        f" ({timestamp.batch} optimizer steps were counted and no epoch_end(): {', '.join(settings)} is in 'ep' "
        f"units, which move only at an epoch end: call {name.lower()}.epoch_end() after each epoch)"
    )
