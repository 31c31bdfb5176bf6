"""The non-finite guard: whether the training weights hold NaN or Inf, before an update blends them in.

With ``skip_nonfinite`` the EMA asks this before each start or update and skips it if any weight is not
finite, so that one diverged step does not poison the average. Under FSDP all ranks decide together.

A non-finite value that the average already holds at the same place (a causal mask of ``-inf`` registered as
a buffer) is not a diverged weight: the update leaves it as it is, so the guard ignores it. Before the start,
when there is no average yet, the reference is the model as attached
(:meth:`~emakit.averaging.tracked.TrackedModel.nonfinite_baseline`). References are keyed by canonical name, so
that a tracked set chosen later (at the start, or from a resumed state) still finds its own values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from emakit.engine.kernels import nonfinite_positions
from emakit.engine.storage import FlatStorage
from emakit.parallel.ranks import all_reduce_sum
from emakit.time import TimeUnit

if TYPE_CHECKING:
    from emakit.averaging.averager import Averager

__all__ = ["finite_or_skip", "skipped_message", "training_weights_finite"]


def finite_or_skip(averager: Averager, count: int) -> bool:
    """With ``skip_nonfinite``, False (a warning, ``num_skipped_nonfinite`` counted) when the training weights
    hold NaN or Inf at ``count``; the reference is the evaluated average once started, else the model as attached."""
    if not averager.skip_nonfinite:
        return True
    averages, tracked, swap = averager._averages, averager._tracked, averager._swap
    storage = averages.storages[averager.eval_average] if averager.started and averages.storages else None
    flat = storage if swap.swapped is None and not tracked.sharded else None
    reference = storage.tensors if storage is not None else averager._baseline
    if training_weights_finite(tracked.names, swap.training_tensors, flat, tracked.sharded, reference):
        return True
    averager.num_skipped_nonfinite += 1
    unit = averager.update_interval.unit
    warnings.warn(skipped_message(unit, count, averager.num_skipped_nonfinite), stacklevel=5)
    return False


def training_weights_finite(
    names: Sequence[str],
    training_tensors: Callable[[], list[torch.Tensor]],
    storage: FlatStorage | None,
    sharded: bool,
    reference: Mapping[str, torch.Tensor],
) -> bool:
    """Whether every floating training weight is finite, on every rank for a ``sharded`` model.

    When the ``storage`` pairs a flattened model's buffers (training weights in the model, not sharded),
    those few buffers are checked, one pass each; otherwise the ``training_tensors()`` one by one (one per
    name of ``names``). Only when a NaN or Inf is found are the tensors compared with ``reference`` (by name):
    non-finite values equal to the reference's at the same place do not count.
    """
    flat_spans = storage.current_flat_sources() if storage is not None else None
    finite = _finite(training_tensors, flat_spans)
    if not finite:
        finite = _only_kept(names, training_tensors(), reference)
    if sharded:  # each rank sees its shards only; all must skip together or the shards drift apart
        device = next((t.device for t in training_tensors()), torch.device("cpu"))
        finite = all_reduce_sum([0.0 if finite else 1.0], device)[0] == 0.0
    return finite


def _finite(training_tensors: Callable[[], list[torch.Tensor]], flat_spans: list[torch.Tensor] | None) -> bool:
    # NaN and Inf propagate through min and max.
    if flat_spans is None:
        spans = [t for t in training_tensors() if t.is_floating_point() and t.numel() > 0]
        if not spans:
            return True
        # The max-abs norm is Inf/NaN exactly when a value is; unlike the 2-norm it cannot overflow.
        norms = torch._foreach_norm(spans, float("inf"))
        return bool(torch.stack([n.float() for n in norms]).isfinite().all())
    for span in flat_spans:
        low, high = torch.aminmax(span)
        if not (bool(low.isfinite()) and bool(high.isfinite())):
            return False
    return True


@torch.no_grad()
def _only_kept(names: Sequence[str], tensors: Sequence[torch.Tensor], reference: Mapping[str, torch.Tensor]) -> bool:
    """Whether every NaN or Inf of ``tensors`` is also in ``reference`` at the same place (NaN matching NaN)."""
    for i in nonfinite_positions(tensors):
        ref = reference.get(names[i])
        if ref is None or ref.shape != tensors[i].shape:
            return False
        t = tensors[i].detach()
        ref = ref.to(device=t.device)
        same = torch.eq(t, ref) | (t.isnan() & ref.isnan())
        if not bool((same | t.isfinite()).all()):
            return False
    return True


def skipped_message(unit: TimeUnit, count: int, num_skipped: int) -> str:
    """The warning for an update skipped at ``count`` (in ``unit``), the ``num_skipped``-th so far."""
    shown = "batch" if unit == TimeUnit.BATCH else "epoch"
    return (
        f"EMA update at {shown} {count} skipped: the training weights contain NaN or Inf ({num_skipped} skipped so far)"
    )
