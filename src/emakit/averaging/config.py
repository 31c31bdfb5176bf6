"""The EMA's constructor arguments, checked and normalised into :class:`Settings`.

Everything here happens once, before any model is seen: which of ``half_life`` / ``smoothing`` /
``sigma_rel`` was given, the per-average coefficients and profiles, the update and snapshot intervals,
``ema_start`` and the flags. A bad argument fails here with its name, its value and what is accepted.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emakit.averaging.snapshots import check_snapshot_folder_writable
from emakit.engine.kernels import validate_smoothing
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile, Profile
from emakit.posthoc.snapshots import SNAPSHOT_DTYPES
from emakit.time import Time, TimeUnit

__all__ = [
    "DEFAULT_HALF_LIFE",
    "UPDATE_UNITS",
    "Settings",
    "check_at_attach",
    "check_eval_average",
    "describe",
    "low_precision_message",
    "not_started_message",
    "parse_settings",
]


class _DefaultHalfLife(str):
    """Marks the default ``half_life`` so that ``EMA(smoothing=0.99)`` works without ``half_life=None``."""


DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")
UPDATE_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH)


@dataclass
class Settings:
    """The EMA's hyperparameters after checking (the attributes of the same names on :class:`EMA`)."""

    half_life: Time | None
    half_lives: list[Time]
    update_interval: Time
    #: One profile per tracked average; ``smoothings[j]`` is its constant coefficient (None for power profiles).
    profiles: list[Profile]
    smoothings: list[float | None]
    #: The first average's constant coefficient (NaN for a power profile, whose coefficient changes).
    smoothing: float
    num_averages: int
    eval_average: int
    ema_start: Time
    snapshot_interval: Time | None
    snapshot_folder: Path | None
    snapshot_dtype: torch.dtype
    fp32_ema: bool
    skip_nonfinite: bool
    flatten_model: bool
    overlap: bool


def check_eval_average(index: Any, num_averages: int) -> int:
    """``index`` if it is an index into ``num_averages`` tracked averages; ValueError otherwise."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_averages:
        raise ValueError(f"eval_average must be an index into the {num_averages} tracked average(s), got {index!r}")
    return index


def parse_settings(
    half_life: str | Time | None,
    smoothing: float | None,
    ema_start: str | Time,
    update_interval: str | Time | None,
    fp32_ema: bool,
    skip_nonfinite: bool,
    flatten_model: bool,
    overlap: bool,
    sigma_rel: float | Sequence[float] | None,
    snapshot_interval: str | Time | None,
    snapshot_folder: str | os.PathLike[str] | None,
    snapshot_dtype: torch.dtype,
    eval_average: int,
    stacklevel: int = 2,
) -> Settings:
    """Check :class:`EMA`'s arguments (same meaning) and derive the per-average coefficients and profiles.

    ``stacklevel`` is that of a warning about a long ``update_interval``, as :func:`warnings.warn` counts it
    from this function.
    """
    explicit_half_life = half_life is not None and not isinstance(half_life, _DefaultHalfLife)
    given = [
        name
        for name, value in (("half_life", explicit_half_life), ("smoothing", smoothing), ("sigma_rel", sigma_rel))
        if value is not None and value is not False
    ]
    if len(given) > 1:
        shown = ", ".join(
            f"{n}={v!r}"
            for n, v in (("half_life", half_life), ("smoothing", smoothing), ("sigma_rel", sigma_rel))
            if n in given
        )
        raise ValueError(f"give exactly one of half_life, smoothing and sigma_rel, got {shown}")
    if smoothing is None and half_life is None and sigma_rel is None:
        raise ValueError("give exactly one of half_life, smoothing and sigma_rel, got none")
    given_half_lives: list[Any] = [half_life]
    if isinstance(half_life, (list, tuple)):
        if not half_life:
            raise ValueError("half_life must be a time or a non-empty list of times, got []")
        given_half_lives = list(half_life)
    if sigma_rel is not None:
        half_life = None
    for name, flag in (
        ("fp32_ema", fp32_ema),
        ("skip_nonfinite", skip_nonfinite),
        ("flatten_model", flatten_model),
        ("overlap", overlap),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")

    half_lives: list[Time] = []
    if smoothing is None and half_life is not None:
        for value in given_half_lives:
            parsed = Time.coerce(value, "half_life", UPDATE_UNITS, positive=True)
            if parsed.value <= 0:
                raise ValueError(f"half_life must be greater than 0, got {str(parsed)!r}")
            if half_lives and parsed.unit != half_lives[0].unit:
                raise ValueError(
                    f"half_life: every half-life needs the same unit, got {str(half_lives[0])!r} and {str(parsed)!r}"
                )
            half_lives.append(parsed)
    _check_distinct("half_life", [str(h) for h in half_lives], [h.value for h in half_lives])
    first_half_life = half_lives[0] if half_lives else None
    interval = _parse_update_interval(update_interval, first_half_life)
    profiles, smoothings = _coefficients(smoothing, sigma_rel, half_lives, interval, stacklevel + 1)
    num_averages = len(smoothings)
    check_eval_average(eval_average, num_averages)
    if overlap and num_averages > 1:
        raise ValueError(f"overlap=True works with one average, got {num_averages} (half_life or sigma_rel list)")
    parsed_snapshot_interval = _parse_snapshots(snapshot_interval, snapshot_folder, snapshot_dtype, interval)
    start = Time.coerce(ema_start, "ema_start")
    if start.unit == TimeUnit.DURATION and start.value > 1:
        raise ValueError(f"ema_start in 'dur' must be in [0, 1], got {str(start)!r}")
    if start.value < 0:
        raise ValueError(f"ema_start must be 0 or more, got {str(start)!r}")
    return Settings(
        half_life=first_half_life,
        half_lives=half_lives,
        update_interval=interval,
        profiles=profiles,
        smoothings=smoothings,
        smoothing=smoothings[0] if smoothings[0] is not None else math.nan,
        num_averages=num_averages,
        eval_average=eval_average,
        ema_start=start,
        snapshot_interval=parsed_snapshot_interval,
        snapshot_folder=Path(snapshot_folder) if snapshot_folder is not None else None,
        snapshot_dtype=snapshot_dtype,
        fp32_ema=fp32_ema,
        skip_nonfinite=skip_nonfinite,
        flatten_model=flatten_model,
        overlap=overlap,
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


def _coefficients(
    smoothing: float | None,
    sigma_rel: float | Sequence[float] | None,
    half_lives: list[Time],
    interval: Time,
    stacklevel: int,
) -> tuple[list[Profile], list[float | None]]:
    """One profile and one constant coefficient (None for a power profile) per tracked average."""
    if smoothing is not None:
        coefficient = validate_smoothing(_plain_smoothing(smoothing))
        if coefficient == 1.0:
            warnings.warn(
                "smoothing=1.0 keeps the average at its first value forever: it never moves toward the training "
                "weights. Use a value below 1 (0.999 halves a weight's contribution every 693 updates)",
                stacklevel=stacklevel,
            )
        return ([HalfLifeProfile(-1.0 / math.log2(coefficient))] if 0 < coefficient < 1 else []), [coefficient]
    if sigma_rel is not None:
        values: list[float] = list(sigma_rel) if isinstance(sigma_rel, (list, tuple)) else [sigma_rel]  # type: ignore[list-item]
        if not values:
            raise ValueError("sigma_rel must be a number or a non-empty list of numbers, got []")
        powers = [PowerProfile.from_sigma_rel(v) for v in values]
        _check_distinct("sigma_rel", values, [p.gamma for p in powers])
        return list(powers), [None] * len(values)
    profiles: list[Profile] = []
    smoothings: list[float | None] = []
    for h in half_lives:
        smoothings.append(2.0 ** (-interval.value / h.value))
        profiles.append(HalfLifeProfile(h.value / interval.value))
        if interval.value > h.value:
            warnings.warn(
                f"update_interval='{interval}' is longer than half_life='{h}': each "
                f"update keeps only {smoothings[-1]:.3g} of the average, so it barely smooths; use an "
                "update_interval well below the half-life",
                stacklevel=stacklevel,
            )
    return profiles, smoothings


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


def _plain_smoothing(smoothing: Any) -> Any:
    """A 0-d floating tensor as its Python float (what ``smoothing`` means); anything else unchanged."""
    if isinstance(smoothing, torch.Tensor):
        if smoothing.ndim != 0 or not smoothing.is_floating_point():
            raise ValueError(
                f"smoothing must be a Python float or a 0-d floating tensor in [0, 1], got a tensor of shape "
                f"{tuple(smoothing.shape)} and dtype {smoothing.dtype}"
            )
        return float(smoothing.item())
    return smoothing


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


def low_precision_message(
    dtypes: Sequence[torch.dtype], fp32_ema: bool, smoothings: Sequence[float | None]
) -> str | None:
    """A warning if a 16-bit average (``fp32_ema=False``) would round its updates away; None otherwise.

    An update adds ``(1 - smoothing) * (weights - average)``; once ``1 - smoothing`` is below the dtype's
    resolution, most of it is lost to rounding and the average barely moves. A power profile's ``1 - beta_t`` shrinks
    as about ``(gamma + 1) / t``, so it gets there in any long run.
    """
    low = sorted({str(d) for d in dtypes if d in (torch.float16, torch.bfloat16)})
    if fp32_ema or not low:
        return None
    eps = max(torch.finfo(getattr(torch, d.removeprefix("torch."))).eps for d in low)
    if any(s is None for s in smoothings):
        why = "a sigma_rel average's coefficient 1 - beta_t shrinks as training goes on and falls below it"
    elif any(s is not None and 0 < 1 - s < eps for s in smoothings):
        shown = min(s for s in smoothings if s is not None and 1 - s > 0)
        why = f"1 - smoothing = {1 - shown:.3g} is below it"
    else:
        return None
    return (
        f"fp32_ema=False keeps the average in the model's {', '.join(low)}, whose resolution is {eps:.3g}: {why}, "
        "so updates round away, whole or in part, and the average lags far behind. Keep fp32_ema=True (the default)"
    )


def describe(
    half_lives: Sequence[Time],
    half_life: Time | None,
    profiles: Sequence[Profile],
    smoothing: float,
    update_interval: Time,
    ema_start: Time,
) -> str:
    """The EMA's ``repr``: its timing as the user gave it, then the interval, the start and the coefficient."""
    if len(half_lives) > 1:
        timing = f"half_life={[str(h) for h in half_lives]}"
    elif half_life is not None:
        timing = f"half_life='{half_life}'"
    elif isinstance(profiles[0] if profiles else None, PowerProfile):
        timing = f"sigma_rel={[round(p.sigma_rel, 6) for p in profiles if isinstance(p, PowerProfile)]}"
    else:
        timing = f"smoothing={smoothing}"
    shown = f", smoothing={smoothing:.6g}" if not math.isnan(smoothing) else ""
    return f"EMA({timing}, update_interval='{update_interval}', ema_start='{ema_start}'{shown})"


def check_at_attach(
    snapshot_folder: Path | None,
    live: Sequence[torch.Tensor],
    fp32_ema: bool,
    smoothings: Sequence[float | None],
    stacklevel: int,
) -> None:
    """What only the model can tell: a snapshot folder that cannot be written is refused now, not hours in; a
    16-bit average whose updates would round away warns."""
    if snapshot_folder is not None:
        check_snapshot_folder_writable(snapshot_folder)
    if message := low_precision_message([t.dtype for t in live], fp32_ema, list(smoothings)):
        warnings.warn(message, stacklevel=stacklevel + 1)


def not_started_message(update_interval: Time, ema_start: Time) -> str:
    """Why the average is not there yet, and when it will be."""
    unit = "batch end (optimizer step)" if update_interval.unit == TimeUnit.BATCH else "epoch end"
    return (
        f"the EMA has not started yet: it starts as a copy of the weights at the first {unit} where "
        f"training progress reaches ema_start='{ema_start}'"
    )
