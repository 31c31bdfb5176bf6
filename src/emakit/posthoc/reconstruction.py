"""Reconstruct an average of any length from a snapshot folder, one batch of tensors at a time.

The coefficients come from :func:`emakit.posthoc.profiles.solve_coefficients` over every (snapshot, average)
pair taken at or before the target time; the result is ``sum_i x_i snapshot_i``, accumulated in float64 per
tensor so that large coefficients of opposite signs do not cost precision. Tensors are read lazily, a batch
of names at a time from every snapshot, so memory stays about one model (the result) plus one batch,
whatever the number of snapshots. Integer and bool tensors are taken from the latest snapshot used.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from emakit._version import __version__
from emakit.posthoc import POOR_FIT, UNREPRESENTABLE
from emakit.posthoc.profiles import (
    HalfLifeProfile,
    PowerProfile,
    Profile,
    UniformWindow,
    fit_error,
    solve_coefficients,
)
from emakit.posthoc.snapshots import (
    RAW,
    SNAPSHOT_DTYPES,
    START,
    SnapshotInfo,
    SnapshotReader,
    missing_snapshot_indices,
    read_snapshot_index,
)
from emakit.posthoc.snapshots.reading import describe_indices
from emakit.posthoc.targets import (
    Kernel,
    KernelFunction,
    RawTarget,
    kernel_fit,
    kernel_from_function,
    parse_kernel,
)
from emakit.safetensors_file import tensor_entries, write_safetensors

__all__ = [
    "RECONSTRUCTION_METADATA_KEY",
    "ReconstructionPlan",
    "check_output",
    "describe",
    "execute_plan",
    "gap_message",
    "plan_reconstruction",
    "poor_fit_message",
    "reconstruct",
]

#: Key of the safetensors header metadata of a reconstructed file (JSON: target, t, snapshots used, fit error).
RECONSTRUCTION_METADATA_KEY = "emakit.posthoc.reconstruction"
_BATCH_BYTES = 256 << 20
#: A half-life so short that its average after update t is the weights of update t alone.
_POINT = HalfLifeProfile(1e-9)


@dataclasses.dataclass(frozen=True)
class ReconstructionPlan:
    """What :func:`reconstruct` will sum: ``coefficient * snapshot[average]`` for each term."""

    target: Profile | UniformWindow | Kernel | RawTarget
    t: int
    #: (snapshot, average index or ``"raw"`` / ``"start"``, coefficient) with a non-zero coefficient
    terms: tuple[tuple[SnapshotInfo, int | str, float], ...]
    #: relative L2 distance between the fitted and the target profile (0: exact)
    fit_error: float
    #: the snapshot the integer tensors come from: the latest at or before ``t``
    latest: SnapshotInfo
    snapshots: tuple[SnapshotInfo, ...]


def _target(sigma_rel: object, half_life: object, window: object = None) -> Profile | UniformWindow:
    if sum(v is not None for v in (sigma_rel, half_life, window)) != 1:
        raise ValueError(
            "give exactly one of sigma_rel, half_life, window and kernel (the target average), got "
            f"sigma_rel={sigma_rel!r}, half_life={half_life!r}, window={window!r}"
        )
    if window is not None:
        return UniformWindow(1)  # its length is known once t is; see _window
    if sigma_rel is not None:
        return PowerProfile.from_sigma_rel(sigma_rel)  # type: ignore[arg-type]
    return HalfLifeProfile(half_life)  # type: ignore[arg-type]


def _kernel_arguments(kernel: object, others: dict[str, object]) -> dict[str, object]:
    """``kernel`` (a ``NAME:VALUE`` string, a :class:`Kernel` or a function ``f(k, t)``) as target arguments."""
    given = {name: value for name, value in others.items() if value is not None}
    if given:
        raise ValueError(
            f"give exactly one of sigma_rel, half_life, window and kernel (the target average), got kernel={kernel!r} "
            f"and {', '.join(f'{n}={v!r}' for n, v in given.items())}"
        )
    if isinstance(kernel, str):
        return parse_kernel(kernel)
    if isinstance(kernel, (Kernel, RawTarget)):
        return {"kernel": kernel}
    return {"kernel": kernel_from_function(kernel)}  # type: ignore[arg-type]


def plan_reconstruction(
    snapshots: str | os.PathLike[str] | Sequence[SnapshotInfo],
    *,
    sigma_rel: float | None = None,
    half_life: float | None = None,
    t: int | None = None,
    window: float | tuple[int, int] | None = None,
    kernel: str | Kernel | RawTarget | KernelFunction | None = None,
) -> ReconstructionPlan:
    """The coefficients that reconstruct the target average from a snapshot folder (or its index).

    The target is a power profile of relative width ``sigma_rel`` or a constant ``half_life`` in EMA updates,
    at ``t`` EMA updates (default: the last snapshot's ``t``); or ``window``, the equal-weight average (SWA)
    of a window of updates: a fraction in (0, 1] (the last 20% of the updates up to ``t``: 0.2), or
    ``(t0, t1)``, the updates after ``t0`` up to ``t1`` (then ``t`` is ``t1``). Windows are fitted best, and
    exactly at snapshots, when a uniform profile (``sigma_rel=1/sqrt(12)``) is among the tracked averages.
    Or ``kernel``: any weights over the updates (:mod:`~emakit.posthoc.targets`): a name such as
    ``"cosine:0.2"``, a :class:`~emakit.posthoc.targets.Kernel`, or a function ``f(k, t)``; or a target that
    weighs the raw training weights (``"raw"``, ``"bema:RHO,GAMMA,KAPPA,ETA"``, a
    :class:`~emakit.posthoc.targets.RawTarget`), at a ``t`` whose snapshot holds them.

    Raises:
        ValueError: not exactly one target, one out of range, or ``t`` not an integer >= 1, before the first
            snapshot or after the last one (each names the argument and the file); a target the snapshots
            cannot represent: none of those at or before ``t`` weighs any of its updates, or the best
            combination is no closer to it than nothing (a profile fit error of 100% or more); a target of the
            raw weights from snapshots without them (at ``t``, or ``theta_0`` in the first).
    """
    if kernel is not None:
        targets = _kernel_arguments(kernel, {"sigma_rel": sigma_rel, "half_life": half_life, "window": window})
        if "kernel" not in targets:
            return plan_reconstruction(snapshots, t=t, **targets)  # type: ignore[arg-type]
    index = read_snapshot_index(snapshots) if isinstance(snapshots, (str, os.PathLike)) else list(snapshots)
    if not index:
        raise ValueError("snapshots is empty: at least one snapshot is needed to reconstruct an average")
    target: Profile | UniformWindow | Kernel | RawTarget = (
        targets["kernel"] if kernel is not None else _target(sigma_rel, half_life, window)  # type: ignore[assignment]
    )
    first, last = index[0], index[-1]
    if isinstance(window, tuple):
        t = _window_end(window, t)
    if t is None:
        t = last.t
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
        raise ValueError(f"t must be an integer >= 1 (EMA updates), got {t!r}")
    t = int(t)
    if t > last.t:
        raise ValueError(
            f"t={t} is after the last snapshot, {str(last.path)!r} (t={last.t}): a reconstruction cannot "
            "extrapolate; pass a t at or before it"
        )
    if t < first.t:
        raise ValueError(f"t={t} is before the first snapshot, {str(first.path)!r} (t={first.t})")
    if window is not None:
        target = _window(window, t)
    sources = [(profile, info.t) for info in index for profile in info.profiles]
    pairs: list[tuple[SnapshotInfo, int | str]] = [(info, j) for info in index for j in range(len(info.profiles))]
    if isinstance(target, RawTarget):
        x, error, read = _raw_fit(index, sources, target, t)
        pairs += [pair for pair, _ in read]
        x = np.concatenate([x, [c for _, c in read]])
    elif isinstance(target, Kernel):
        x, error = kernel_fit(sources, target, t)
    else:
        x = solve_coefficients(sources, target, t)  # 0 for snapshots after t
        error = fit_error(sources, x, target, t)
    if not error < UNREPRESENTABLE:
        raise ValueError(
            f"the snapshots cannot represent {target} at t={t}: the best combination of those at or before it has "
            f"a profile fit error of {100 * error:.3g}%, no closer than nothing; reconstruct at a snapshot's t, or "
            "track (and snapshot) profiles nearer this target"
        )
    terms = tuple((info, j, float(c)) for (info, j), c in zip(pairs, x, strict=True) if c != 0.0)
    latest = [info for info in index if info.t <= t][-1]
    return ReconstructionPlan(target, t, terms, error, latest, tuple(index))


def _raw_fit(
    index: Sequence[SnapshotInfo], sources: list[tuple[Profile, int]], target: RawTarget, t: int
) -> tuple[np.ndarray, float, list[tuple[tuple[SnapshotInfo, str], float]]]:
    """The averages' coefficients for ``target``'s fitted part, its fit error (relative to the whole target's
    weights) and the raw terms read as they are: ``((snapshot, "raw" or "start"), coefficient)``.

    Raises:
        ValueError: the snapshots lack the raw weights at ``t`` or, for a target that weighs them, ``theta_0``.
    """
    folder = str(index[0].path.parent)
    with_raw = [info for info in index if info.raw]
    if not with_raw:
        raise ValueError(
            f"kernel {target} weighs the raw training weights, which the snapshots in {folder!r} do not hold (written "
            "without them): write them with EMA(..., snapshot_raw=True), or choose a kernel of the averages "
            "(emakit posthoc --list-kernels)"
        )
    now = next((info for info in with_raw if info.t == t), None)
    if now is None:
        shown = ", ".join(str(info.t) for info in with_raw[:8]) + (", ..." if len(with_raw) > 8 else "")
        raise ValueError(
            f"kernel {target} at t={t}: no snapshot in {folder!r} holds the raw weights after update {t}; those "
            f"that hold raw weights are at t={shown}: reconstruct at one of them"
        )
    kernel, now_weight, start_weight = target.parts(t, now.update_interval)
    read = [((now, RAW), now_weight)]
    if start_weight:
        if not index[0].start:
            raise ValueError(
                f"kernel {target} needs theta_0, the weights at the start, which the first snapshot "
                f"{str(index[0].path)!r} does not hold (written without snapshot_raw=True, or not the series' first "
                "snapshot: snapshot-000000 is missing)"
            )
        read.append(((index[0], START), start_weight))
    if kernel is None:
        return np.zeros(len(sources)), 0.0, read
    # The raw weights after update t_i are the average of a vanishing half-life at t_i: they join the fit.
    points = [info for info in with_raw if info.t <= t]
    x, error = kernel_fit([*sources, *((_POINT, info.t) for info in points)], kernel, t)
    merged: dict[tuple[int, str], tuple[tuple[SnapshotInfo, str], float]] = {
        (i.index, j): ((i, j), c) for (i, j), c in read
    }
    for info, c in zip(points, x[len(sources) :], strict=True):
        pair, before = merged.get((info.index, RAW), ((info, RAW), 0.0))
        merged[info.index, RAW] = (pair, before + float(c))
    w = target.weights(t, now.update_interval)
    error *= float(np.linalg.norm(kernel.masses(t))) / float(np.linalg.norm(w))
    return x[: len(sources)], error, list(merged.values())


def _window_end(window: tuple[object, ...], t: object) -> int:
    """``t1`` of a ``(t0, t1)`` window, checked (and ``t``, if given, must be it)."""
    ends = window if len(window) == 2 else ()
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in ends) or not ends:
        raise ValueError(f"window must be a fraction in (0, 1] or a (t0, t1) pair of EMA updates, got {window!r}")
    t0, t1 = int(ends[0]), int(ends[1])  # type: ignore[call-overload]
    if not 0 <= t0 < t1:
        raise ValueError(f"window (t0, t1) needs 0 <= t0 < t1 (EMA updates), got {window!r}")
    if t is not None and t != t1:
        raise ValueError(f"window={window!r} ends at t={t1}; t={t!r} must be left out or equal it")
    return t1


def _window(window: object, t: int) -> UniformWindow:
    """The uniform window ending at ``t``: ``(t0, t)`` or the last ``fraction`` of ``[0, t]`` (whole updates)."""
    if isinstance(window, tuple):
        return UniformWindow(t - int(window[0]))
    if isinstance(window, bool) or not isinstance(window, numbers.Real) or not 0 < float(window) <= 1:
        raise ValueError(f"window must be a fraction in (0, 1] or a (t0, t1) pair of EMA updates, got {window!r}")
    return UniformWindow(max(1, round(float(window) * t)))


def _batches(info: SnapshotInfo, names: Sequence[str], budget: int) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    used = 0
    for name in names:
        shape = info.tensors[name][0]
        nbytes = 8 * max(1, int(torch.Size(shape).numel()))
        if batches[-1] and used + nbytes > budget:
            batches.append([])
            used = 0
        batches[-1].append(name)
        used += nbytes
    return [b for b in batches if b]


def reconstruct(
    folder: str | os.PathLike[str],
    sigma_rel: float | None = None,
    half_life: float | None = None,
    t: int | None = None,
    out: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    batch_bytes: int = _BATCH_BYTES,
    window: float | tuple[int, int] | None = None,
    kernel: str | Kernel | RawTarget | KernelFunction | None = None,
    overwrite: bool = False,
) -> dict[str, torch.Tensor]:
    """The average with profile ``sigma_rel`` (power) or ``half_life`` (EMA updates) at ``t``, the uniform
    ``window`` or any ``kernel`` (see :func:`plan_reconstruction`), from ``folder``.

    Returns the tensors by canonical name (floating ones in ``dtype``, on the CPU); with ``out``, also writes
    them as a safetensors file (atomically) that loads with ``safetensors.torch.load_file``; an existing
    ``out`` is replaced only with ``overwrite=True``, and never when it is one of the snapshots. Works on
    sharded snapshot directories without a process group. ``batch_bytes`` bounds the float64 accumulators
    held at once.

    Warns when snapshots are missing from the series (a gap in the indices) and when the snapshots
    represent the target poorly (a profile fit error above :data:`emakit.posthoc.POOR_FIT`), as
    ``emakit posthoc`` does.

    Raises:
        ValueError: see :func:`plan_reconstruction` and :func:`~emakit.posthoc.snapshots.read_snapshot_index`;
            ``dtype`` not a snapshot dtype; ``out`` is a snapshot or inside the snapshot folder.
        FileExistsError: ``out`` exists and ``overwrite`` is not True.
    """
    plan = plan_reconstruction(folder, sigma_rel=sigma_rel, half_life=half_life, t=t, window=window, kernel=kernel)
    gap = gap_message(plan.snapshots)
    if gap:
        warnings.warn(gap, stacklevel=2)
    if plan.fit_error > POOR_FIT:
        warnings.warn(poor_fit_message(plan.fit_error), stacklevel=2)
    return execute_plan(plan, out=out, dtype=dtype, batch_bytes=batch_bytes, overwrite=overwrite)


def check_output(plan: ReconstructionPlan, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """``out`` as a path a reconstruction may write: not a snapshot folder's entry, and new unless ``overwrite``.

    Raises:
        ValueError: ``out`` is (or is inside) the snapshot folder, where it would replace or pose as a snapshot.
        FileExistsError: ``out`` exists and ``overwrite`` is not True.
    """
    path = Path(out)
    folder = plan.snapshots[0].path.parent.resolve()
    resolved = path.resolve()
    if resolved == folder or folder in resolved.parents:
        raise ValueError(
            f"out={str(out)!r} is inside the snapshot folder {str(folder)!r}: it would replace or pose as a snapshot; "
            "write the result somewhere else"
        )
    if path.exists() and overwrite is not True:
        raise FileExistsError(
            f"out={str(out)!r} exists: pass overwrite=True (emakit posthoc: --force) to replace it, or choose another name"
        )
    return path


def execute_plan(
    plan: ReconstructionPlan,
    *,
    out: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    batch_bytes: int = _BATCH_BYTES,
    overwrite: bool = False,
) -> dict[str, torch.Tensor]:
    """Sum the snapshots as ``plan`` says (see :func:`reconstruct`, which plans and calls this)."""
    if out is not None:
        check_output(plan, out, overwrite)
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, SNAPSHOT_DTYPES))}, got {dtype!r}")
    if isinstance(batch_bytes, bool) or not isinstance(batch_bytes, int) or batch_bytes < 1:
        raise ValueError(f"batch_bytes must be a positive integer, got {batch_bytes!r}")
    layout = plan.latest.tensors
    floating = [n for n, (_, dt) in layout.items() if dt.is_floating_point or dt.is_complex]
    copied = [n for n in layout if n not in set(floating)]
    result: dict[str, torch.Tensor] = {}
    by_snapshot: dict[int, tuple[SnapshotInfo, list[tuple[int | str, float]]]] = {}
    for info, j, coefficient in plan.terms:
        by_snapshot.setdefault(info.index, (info, []))[1].append((j, coefficient))
    for batch in _batches(plan.latest, floating, batch_bytes):
        sums = {name: torch.zeros(layout[name][0], dtype=torch.float64) for name in batch}
        for info, weights in by_snapshot.values():
            tensors = SnapshotReader(info).read([f"{j}/{name}" for j, _ in weights for name in batch])
            for j, coefficient in weights:
                for name in batch:
                    sums[name].add_(tensors.pop(f"{j}/{name}").to(torch.float64), alpha=coefficient)
        for name in batch:
            result[name] = sums.pop(name).to(dtype)
    if copied:
        latest = SnapshotReader(plan.latest).read([f"0/{name}" for name in copied])
        result.update({name: latest[f"0/{name}"] for name in copied})
    result = {name: result[name] for name in layout}  # the snapshots' order
    if out is not None:
        write_safetensors(
            tensor_entries(result.items()),
            Path(out),
            metadata={RECONSTRUCTION_METADATA_KEY: json.dumps(describe(plan))},
            overwrite=overwrite,
        )
    return result


def gap_message(snapshots: Sequence[SnapshotInfo]) -> str | None:
    """A warning naming the snapshots missing from the series, or None if it has no gap."""
    missing = missing_snapshot_indices(snapshots)
    if not missing:
        return None
    folder = snapshots[0].path.parent
    return (
        f"snapshot folder {str(folder)!r} lacks {describe_indices(missing)} of its series (deleted or lost?): "
        f"the reconstruction uses the {len(snapshots)} left, which may represent the target less well"
    )


def poor_fit_message(fit_error: float) -> str:
    """The warning for a profile fit error above :data:`emakit.posthoc.POOR_FIT`."""
    return (
        f"the snapshots represent this target poorly (profile fit error {100 * fit_error:.3g}%, above "
        f"{100 * POOR_FIT:g}%): targets between the tracked profiles' widths, at a snapshot's t, reconstruct best"
    )


def describe(plan: ReconstructionPlan) -> dict[str, object]:
    """JSON-ready summary of ``plan``: the target, ``t``, the fit error and the snapshots used."""
    used = sorted({info.index for info, _, _ in plan.terms})
    return {
        "emakit_version": __version__,
        "target": plan.target.to_dict(),
        "t": plan.t,
        "step": plan.latest.step + (plan.t - plan.latest.t) * plan.latest.update_interval,
        "update_interval": plan.latest.update_interval,
        "fit_error": plan.fit_error,
        "snapshots_used": len(used),
        "snapshots": [info.path.name for info in plan.snapshots if info.index in set(used)],
    }
