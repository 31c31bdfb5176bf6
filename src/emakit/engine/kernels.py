"""The update of one average: ``t <- t + weight * (s - t)`` (``lerp_``) for floating pairs, ``t <- s`` for others.

``weight`` is ``1 - smoothing``. Pairs are grouped by (device, dtype) and run as multi-tensor
(``torch._foreach_*``) kernels; pairs may differ in dtype (an fp32 EMA of a bf16 model) or device, in which
case the sources are cast chunk by chunk into a cache-sized scratch buffer. :func:`lerp_flat_` is the same
for two 1-D spans (a flat group of :class:`~emakit.engine.plan.UpdatePlan`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "Held",
    "copy_tensors_",
    "grouped_pairs",
    "hold_equal",
    "kernel_key",
    "lerp_cast_",
    "lerp_cast_flat_",
    "lerp_flat_",
    "lerp_grouped_",
    "lerp_tensors_",
    "nonfinite_positions",
    "restore_equal",
    "validate_smoothing",
]


def validate_smoothing(smoothing: object, name: str = "smoothing") -> float:
    """Return ``smoothing`` as a float after checking it is a real number in [0, 1] (a 0-d floating tensor
    is its value; a tensor of other shape or dtype is refused)."""
    if isinstance(smoothing, torch.Tensor):
        if smoothing.ndim != 0 or not smoothing.is_floating_point():
            raise ValueError(
                f"{name} must be a Python float or a 0-d floating tensor in [0, 1], got a tensor of shape "
                f"{tuple(smoothing.shape)} and dtype {smoothing.dtype}"
            )
        value = float(smoothing.item())
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
        return value
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
    value = float(smoothing)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
    return value


def kernel_key(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.device, torch.dtype, torch.device, torch.dtype]:
    """What a pair's multi-tensor kernel is chosen by: both sides' device and dtype."""
    return (a.device, a.dtype, b.device, b.dtype)


def grouped_pairs(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The pairs grouped by :func:`kernel_key`, one multi-tensor kernel each (a caller may keep the grouping)."""
    groups: dict[tuple[torch.device, torch.dtype, torch.device, torch.dtype], tuple[list, list]] = {}
    for t, s in zip(targets, sources, strict=True):
        dst, src = groups.setdefault(kernel_key(t, s), ([], []))
        dst.append(t)
        src.append(s)
    return list(groups.values())


@torch.no_grad()
def lerp_tensors_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight: float) -> None:
    """In place, ``t <- t + weight * (s - t)`` for floating tensor pairs, grouped by (device, dtype).

    ``weight`` is ``1 - smoothing``. Pairs may differ in dtype (an fp32 EMA of a bf16 model) or device.
    """
    if targets:
        lerp_grouped_(grouped_pairs(targets, sources), weight)


@torch.no_grad()
def lerp_grouped_(groups: Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]], weight: float) -> None:
    """:func:`lerp_tensors_` over pairs already grouped by :func:`grouped_pairs` (a copy for ``weight`` 1)."""
    if weight == 0.0:
        return
    for dst, src in groups:
        if weight == 1.0:
            torch._foreach_copy_(dst, src)
            continue
        if dst[0].dtype == src[0].dtype and dst[0].device == src[0].device:
            torch._foreach_lerp_(dst, src, weight)
        else:
            lerp_cast_(dst, src, weight)


def lerp_cast_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight: float) -> None:
    """``lerp_`` for sources of another dtype or device: cast batches of sources into a cache-sized scratch.

    ``lerp`` needs equal dtypes; ``mul_`` + ``add_`` would read and write the EMA twice (and on CPU take a
    slow mixed-dtype loop), and a full cast would allocate a copy of the model.
    """
    chunk = _chunk_elements(targets[0].device)
    scratch = torch.empty(chunk, dtype=targets[0].dtype, device=targets[0].device)
    batch_t: list[torch.Tensor] = []
    batch_s: list[torch.Tensor] = []
    used = 0
    for t, s in zip(targets, sources, strict=True):
        n = t.numel()
        if n > chunk:
            if t.is_contiguous() and s.is_contiguous():
                lerp_flat_(t.view(-1), s.reshape(-1), weight)
            else:
                t.lerp_(s.to(device=t.device, dtype=t.dtype), weight)
            continue
        if used + n > chunk:
            _lerp_batch_(batch_t, batch_s, scratch, weight)
            batch_t, batch_s, used = [], [], 0
        batch_t.append(t)
        batch_s.append(s)
        used += n
    if batch_t:
        _lerp_batch_(batch_t, batch_s, scratch, weight)


def _lerp_batch_(
    targets: list[torch.Tensor], sources: list[torch.Tensor], scratch: torch.Tensor, weight: float
) -> None:
    views, offset = [], 0
    for s in sources:
        views.append(scratch[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    torch._foreach_copy_(views, sources)
    torch._foreach_lerp_(targets, views, weight)


@torch.no_grad()
def copy_tensors_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """In place, ``t <- s`` for every pair, grouped so that each group is one multi-tensor copy."""
    for dst, src in grouped_pairs(targets, sources):
        torch._foreach_copy_(dst, src)


def _chunk_elements(device: torch.device) -> int:
    # Scratch for casting a source chunk: small enough to stay in cache (1 MiB of fp32 on CPU: 1.2x the time
    # of an fp32 lerp_ over the same elements, where mul_ + add_ or a full cast take 5-6x; 16 MiB on GPUs,
    # within an H100's L2), large enough that the per-chunk overhead is a few percent.
    return 1 << 22 if device.type == "cuda" else 1 << 18


@torch.no_grad()
def lerp_flat_(target: torch.Tensor, source: torch.Tensor, weight: float) -> None:
    """``target <- target + weight * (source - target)`` for two 1-D tensors of the same length.

    Equal dtypes and devices take one ``lerp_`` kernel. Otherwise (an fp32 EMA of a bf16 model, an EMA kept
    on another device) the source is cast chunk by chunk into a scratch buffer small enough to stay in
    cache and blended from there: one pass over each buffer, no full-size temporary, and none of the slow
    mixed-dtype elementwise loop that ``mul_`` + ``add_`` takes on CPU.
    """
    if target.dtype == source.dtype and target.device == source.device:
        target.lerp_(source, weight)
    else:
        lerp_cast_flat_(target, source, weight)


def lerp_cast_flat_(target: torch.Tensor, source: torch.Tensor, weight: float) -> None:
    """:func:`lerp_flat_` for a source of another dtype or device, cast chunk by chunk into a scratch."""
    numel = target.numel()
    chunk = _chunk_elements(target.device)
    scratch = torch.empty(min(chunk, numel), dtype=target.dtype, device=target.device)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        part = scratch[: stop - start]
        part.copy_(source[start:stop])
        target[start:stop].lerp_(part, weight)


# ---------------------------------------------------------------- non-finite values equal on both sides
# lerp(a, a, w) == a exactly for finite a, but lerp(-inf, -inf, w) is NaN: a constant causal mask full of -inf
# would turn into NaN in the average. The few pairs whose source holds non-finite values are found once, when
# an update plan is made (:func:`nonfinite_positions`), and around each blend the positions where the average
# equals the source are held (:func:`hold_equal`) and written back (:func:`restore_equal`). Other pairs take
# the plain kernels, untouched.


@torch.no_grad()
def nonfinite_positions(sources: Sequence[torch.Tensor], averaged: Sequence[bool] | None = None) -> list[int]:
    """Positions of the floating (``averaged``) non-empty sources holding a NaN or an Inf; one pass over them.

    A sum is NaN or Inf whenever a term is, and is the cheapest reduction (a tenth of the time of an
    Inf-norm on CPU). A finite tensor whose sum overflows is listed too: holding it costs a little, changes
    nothing.
    """
    picked = [
        i
        for i, s in enumerate(sources)
        if (averaged is None or averaged[i]) and s.is_floating_point() and s.numel() > 0 and s.device.type != "meta"
    ]
    found: list[int] = []
    by_device: dict[torch.device, list[int]] = {}
    for i in picked:
        by_device.setdefault(sources[i].device, []).append(i)
    for members in by_device.values():
        sums = torch.stack([sources[i].detach().sum(dtype=torch.float32) for i in members])
        finite = sums.isfinite().tolist()  # one device sync per device
        found += [i for i, ok in zip(members, finite, strict=True) if not ok]
    return sorted(found)


#: What :func:`hold_equal` keeps per pair: the target, where it equals the source, and its values.
Held = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def hold_equal(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> Held:
    """Before a blend: for each pair, where the target equals its source, and the target's values there."""
    held: Held = []
    for t, s in zip(targets, sources, strict=True):
        keep = torch.eq(t, s)
        held.append((t, keep, t.clone()))
    return held


@torch.no_grad()
def restore_equal(held: Held) -> None:
    """After a blend: write back the values :func:`hold_equal` found equal on both sides (bitwise unchanged)."""
    for t, keep, saved in held:
        t.copy_(torch.where(keep, saved, t))
