"""The averagers' constructor arguments, checked and normalised: the EMA's into a schedule and :class:`Options`.

Everything here happens once, before any model is seen: which of ``half_life`` / ``smoothing`` /
``sigma_rel`` was given and the :mod:`~emakit.averaging.schedules` object it makes, the update and snapshot
intervals, the start, and the flags every averager shares. A bad argument fails here with its name, its value
and what is accepted.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emakit.averaging.schedules import AMOUNT_UNITS, UPDATE_UNITS, Constant, GrowingHalfLife, PerAmount, Power, Schedule
from emakit.averaging.snapshots import check_snapshot_folder_writable
from emakit.averaging.warmup import Warmup, check_warmup
from emakit.engine.kernels import validate_smoothing
from emakit.parallel.zero import refuse_snapshots
from emakit.posthoc.profiles import PowerProfile
from emakit.posthoc.snapshots import SNAPSHOT_DTYPES
from emakit.time import Time, TimeUnit

if TYPE_CHECKING:
    from emakit.averaging.tracked import TrackedModel

__all__ = [
    "DEFAULT_HALF_LIFE",
    "Options",
    "check_at_attach",
    "check_eval_average",
    "check_start",
    "ema_schedule",
    "low_precision_message",
    "parse_options",
]


class _DefaultHalfLife(str):
    """Marks the default ``half_life`` so that ``EMA(smoothing=0.99)`` works without ``half_life=None``."""


DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")


@dataclass(frozen=True)
class Options:
    """What every averager takes besides its schedule, after checking (see :class:`~emakit.averaging.EMA`)."""

    fp32_ema: bool = True
    skip_nonfinite: bool = False
    flatten_model: bool = False
    overlap: bool = False
    snapshot_interval: Time | None = None
    snapshot_folder: Path | None = None
    snapshot_dtype: torch.dtype = torch.float32
    eval_average: int = 0
    snapshot_raw: bool = False


def check_eval_average(index: Any, num_averages: int) -> int:
    """``index`` if it is an index into ``num_averages`` tracked averages; ValueError otherwise."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_averages:
        raise ValueError(f"eval_average must be an index into the {num_averages} tracked average(s), got {index!r}")
    return index


def ema_schedule(
    half_life: str | Time | Sequence[str | Time] | None,
    smoothing: float | None,
    sigma_rel: float | Sequence[float] | None,
    ema_start: str | Time,
    update_interval: str | Time | None,
    warmup: bool | Warmup | None,
    snapshot_folder: object = None,
    stacklevel: int = 2,
    half_life_fraction: float | Sequence[float] | None = None,
) -> Constant | Power | GrowingHalfLife | PerAmount:
    """The EMA's schedule from its timing arguments (same meaning as :class:`~emakit.averaging.EMA`'s).

    ``stacklevel`` is that of a warning about a long ``update_interval``, as :func:`warnings.warn` counts it
    from this function.
    """
    explicit_half_life = half_life is not None and not isinstance(half_life, _DefaultHalfLife)
    named: tuple[tuple[str, Any], ...] = (("half_life", half_life), ("smoothing", smoothing), ("sigma_rel", sigma_rel))
    named += (("half_life_fraction", half_life_fraction),)
    given = [n for n, v in named if v is not None and (n != "half_life" or explicit_half_life)]
    if len(given) > 1:
        shown = ", ".join(f"{n}={v!r}" for n, v in named if n in given)
        raise ValueError(f"give exactly one of half_life, smoothing, sigma_rel and half_life_fraction, got {shown}")
    if all(v is None for _, v in named):
        raise ValueError("give exactly one of half_life, smoothing, sigma_rel and half_life_fraction, got none")
    if half_life_fraction is not None:
        return _growing(half_life_fraction, update_interval, ema_start, warmup)
    given_half_lives: list[Any] = [half_life]
    if isinstance(half_life, (list, tuple)):
        if not half_life:
            raise ValueError("half_life must be a time or a non-empty list of times, got []")
        given_half_lives = list(half_life)
    half_lives: list[Time] = []
    if smoothing is None and sigma_rel is None and half_life is not None:
        for value in given_half_lives:
            parsed = Time.coerce(value, "half_life", UPDATE_UNITS + AMOUNT_UNITS, positive=True)
            if parsed.value <= 0:
                raise ValueError(f"half_life must be greater than 0, got {str(parsed)!r}")
            if half_lives and parsed.unit != half_lives[0].unit:
                raise ValueError(
                    f"half_life: every half-life needs the same unit, got {str(half_lives[0])!r} and {str(parsed)!r}"
                )
            half_lives.append(parsed)
    _check_distinct("half_life", [str(h) for h in half_lives], [h.value for h in half_lives])
    if half_lives and half_lives[0].unit in AMOUNT_UNITS:
        if warmup:
            raise ValueError(f"warmup applies to half-lives in 'ba' or 'ep', got half_life='{half_lives[0]}'")
        return PerAmount(
            tuple(half_lives), _parse_update_interval(update_interval, None), check_start(ema_start, "ema_start")
        )
    interval = _parse_update_interval(update_interval, half_lives[0] if half_lives else None)
    start = check_start(ema_start, "ema_start")
    checked_warmup = check_warmup(warmup, sigma_rel, snapshot_folder)
    if smoothing is not None:
        coefficient = validate_smoothing(smoothing)
        if coefficient == 1.0:
            warnings.warn(
                "smoothing=1.0 keeps the average at its first value forever: it never moves toward the training "
                "weights. Use a value below 1 (0.999 halves a weight's contribution every 693 updates)",
                stacklevel=stacklevel,
            )
        return Constant((coefficient,), interval, start, warmup=checked_warmup)
    if sigma_rel is not None:
        values: list[float] = list(sigma_rel) if isinstance(sigma_rel, (list, tuple)) else [sigma_rel]  # type: ignore[list-item]
        if not values:
            raise ValueError("sigma_rel must be a number or a non-empty list of numbers, got []")
        powers = [PowerProfile.from_sigma_rel(v) for v in values]
        _check_distinct("sigma_rel", values, [p.gamma for p in powers])
        return Power(tuple(p.gamma for p in powers), interval, start)
    smoothings = []
    for h in half_lives:
        smoothings.append(2.0 ** (-interval.value / h.value))
        if interval.value > h.value:
            warnings.warn(
                f"update_interval='{interval}' is longer than half_life='{h}': each "
                f"update keeps only {smoothings[-1]:.3g} of the average, so it barely smooths; use an "
                "update_interval well below the half-life",
                stacklevel=stacklevel,
            )
    return Constant(tuple(smoothings), interval, start, half_lives=tuple(half_lives), warmup=checked_warmup)


def _growing(
    half_life_fraction: float | Sequence[float], update_interval: str | Time | None, start: str | Time, warmup: object
) -> GrowingHalfLife:
    """The schedule of ``half_life_fraction`` (one fraction or a list, each finite and above 0)."""
    values: list[Any] = (
        list(half_life_fraction) if isinstance(half_life_fraction, (list, tuple)) else [half_life_fraction]
    )
    if not values:
        raise ValueError("half_life_fraction must be a number or a non-empty list of numbers, got []")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"half_life_fraction must be a finite number greater than 0, got {value!r}")
    _check_distinct("half_life_fraction", values, [float(v) for v in values])
    if warmup:
        raise ValueError("warmup applies to half_life / smoothing averages; half_life_fraction has its own ramp")
    interval = _parse_update_interval(update_interval, None)
    return GrowingHalfLife(tuple(float(v) for v in values), interval, check_start(start, "ema_start"))


def check_start(start: str | Time, name: str) -> Time:
    """A start time (``ema_start``, ``swa_start``): any unit, not negative, a ``'dur'`` fraction in [0, 1]."""
    parsed = Time.coerce(start, name)
    if parsed.unit == TimeUnit.DURATION and parsed.value > 1:
        raise ValueError(f"{name} in 'dur' must be in [0, 1], got {str(parsed)!r}")
    if parsed.value < 0:
        raise ValueError(f"{name} must be 0 or more, got {str(parsed)!r}")
    return parsed


def parse_options(
    schedule: Schedule,
    *,
    fp32_ema: bool = True,
    skip_nonfinite: bool = False,
    flatten_model: bool = False,
    overlap: bool = False,
    snapshot_interval: str | Time | None = None,
    snapshot_folder: str | os.PathLike[str] | None = None,
    snapshot_dtype: torch.dtype = torch.float32,
    eval_average: int = 0,
    snapshot_raw: bool = False,
) -> Options:
    """Check the arguments every averager shares (same meaning as :class:`~emakit.averaging.EMA`'s)."""
    for name, flag in (
        ("fp32_ema", fp32_ema),
        ("skip_nonfinite", skip_nonfinite),
        ("flatten_model", flatten_model),
        ("overlap", overlap),
        ("snapshot_raw", snapshot_raw),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    check_eval_average(eval_average, schedule.num_averages)
    if overlap and schedule.num_averages > 1:
        raise ValueError(
            f"overlap=True works with one average, got {schedule.num_averages} (half_life or sigma_rel list)"
        )
    interval = _parse_snapshots(snapshot_interval, snapshot_folder, snapshot_dtype, schedule.update_interval)
    if snapshot_folder is not None and not schedule.profiles:
        raise ValueError(
            f"snapshot_folder: post-hoc reconstruction needs averages of a known profile (half_life in 'ba'/'ep', "
            f"sigma_rel or SWA), got {schedule.describe()}: give snapshot_folder or this averaging, not both"
        )
    if snapshot_raw and snapshot_folder is None:
        raise ValueError("snapshot_raw=True writes the raw weights into the snapshots: give snapshot_folder too")
    return Options(
        fp32_ema=fp32_ema,
        skip_nonfinite=skip_nonfinite,
        flatten_model=flatten_model,
        overlap=overlap,
        snapshot_interval=interval,
        snapshot_folder=Path(snapshot_folder) if snapshot_folder is not None else None,
        snapshot_dtype=snapshot_dtype,
        eval_average=eval_average,
        snapshot_raw=snapshot_raw,
    )


def _parse_update_interval(update_interval: str | Time | None, half_life: Time | None) -> Time:
    default = Time(1, half_life.unit) if half_life is not None else Time(1, TimeUnit.BATCH)
    interval = (
        default
        if update_interval is None
        else Time.coerce(update_interval, "update_interval", UPDATE_UNITS, positive=True)
    )
    if interval.value <= 0:
        raise ValueError(f"update_interval must be greater than 0, got {str(interval)!r}")
    if half_life is not None and interval.unit != half_life.unit:
        raise ValueError(
            f"update_interval must be in half_life's unit {half_life.unit.value!r}, "
            f"got update_interval={str(interval)!r} and half_life={str(half_life)!r}"
        )
    return interval


def _parse_snapshots(
    snapshot_interval: str | Time | None,
    snapshot_folder: str | os.PathLike[str] | None,
    snapshot_dtype: torch.dtype,
    update_interval: Time,
) -> Time | None:
    if (snapshot_interval is None) != (snapshot_folder is None):
        raise ValueError(
            "give snapshot_interval and snapshot_folder together, got "
            f"snapshot_interval={snapshot_interval!r} and snapshot_folder={snapshot_folder!r}"
        )
    parsed = None
    if snapshot_interval is not None:
        parsed = Time.coerce(snapshot_interval, "snapshot_interval", (update_interval.unit,))
        if parsed.value <= 0 or parsed.value % update_interval.value:
            raise ValueError(
                f"snapshot_interval must be a positive multiple of update_interval='{update_interval}', "
                f"got {str(parsed)!r}"
            )
    if snapshot_dtype not in SNAPSHOT_DTYPES:
        raise ValueError(
            f"snapshot_dtype must be one of {', '.join(map(str, SNAPSHOT_DTYPES))}, got {snapshot_dtype!r}"
        )
    return parsed


def _check_distinct(name: str, shown: Sequence[Any], values: Sequence[float]) -> None:
    """ValueError if two averages of a list get the same profile: they would track one average twice."""
    for i, value in enumerate(values):
        for j in range(i):
            if math.isclose(value, values[j], rel_tol=1e-9):
                raise ValueError(
                    f"{name}: every average needs its own value, got {list(shown)!r} ({shown[j]!r} and "
                    f"{shown[i]!r} are the same profile): duplicates track one average twice and make a post-hoc "
                    "reconstruction from their snapshots singular"
                )


def low_precision_message(dtypes: Sequence[torch.dtype], fp32_ema: bool, schedule: Schedule) -> str | None:
    """A warning if a 16-bit average (``fp32_ema=False``) would round its updates away; None otherwise.

    An update adds ``(1 - smoothing) * (weights - average)``; once ``1 - smoothing`` is below the dtype's
    resolution, most of it is lost to rounding and the average barely moves. A power profile's ``1 - beta_t`` shrinks
    as about ``(gamma + 1) / t``, so it gets there in any long run.
    """
    low = sorted({str(d) for d in dtypes if d in (torch.float16, torch.bfloat16)})
    if fp32_ema or not low:
        return None
    eps = max(torch.finfo(getattr(torch, d.removeprefix("torch."))).eps for d in low)
    smoothings = schedule.smoothings if isinstance(schedule, Constant) else ()
    if isinstance(schedule, Power):
        why = "a sigma_rel average's coefficient 1 - beta_t shrinks as training goes on and falls below it"
    elif not isinstance(schedule, Constant):
        why = "the weight of each new model, 1/n, shrinks as the window goes on and falls below it"
    elif any(0 < 1 - s < eps for s in smoothings):
        shown = min(s for s in smoothings if 1 - s > 0)
        why = f"1 - smoothing = {1 - shown:.3g} is below it"
    else:
        return None
    return (
        f"fp32_ema=False keeps the average in the model's {', '.join(low)}, whose resolution is {eps:.3g}: {why}, "
        "so updates round away, whole or in part, and the average lags far behind. Keep fp32_ema=True (the default)"
    )


def check_at_attach(
    snapshot_folder: Path | None, fp32_ema: bool, tracked: TrackedModel, schedule: Schedule, stacklevel: int
) -> None:
    """What only the model can tell: a snapshot folder that cannot be written is refused now, not hours in (and
    under ZeRO-3, whose partitions snapshots cannot hold yet); a 16-bit average whose updates would round away warns."""
    if snapshot_folder is not None:
        if tracked.zero3:  # ZeRO-3 (parallel/zero.py)
            refuse_snapshots()
        check_snapshot_folder_writable(snapshot_folder)
    if message := low_precision_message([t.dtype for t in tracked.live()], fp32_ema, schedule):
        warnings.warn(message, stacklevel=stacklevel + 1)
