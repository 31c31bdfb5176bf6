"""The non-finite guard: whether the training weights hold NaN or Inf, before an update blends them in.

With ``skip_nonfinite`` the EMA asks this before each start or update and skips it if any weight is not
finite, so that one diverged step does not poison the average. Under FSDP all ranks decide together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from emakit.engine.storage import FlatStorage
from emakit.parallel.ranks import all_reduce_sum
from emakit.time import TimeUnit

__all__ = ["skipped_message", "training_weights_finite"]


def training_weights_finite(
    training_tensors: Callable[[], list[torch.Tensor]], storage: FlatStorage | None, sharded: bool
) -> bool:
    """Whether every floating training weight is finite, on every rank for a ``sharded`` model.

    When the ``storage`` pairs a flattened model's buffers (training weights in the model, not sharded),
    those few buffers are checked, one pass each; otherwise the ``training_tensors()`` one by one.
    """
    flat_spans = storage.current_flat_sources() if storage is not None else None
    finite = _finite(training_tensors, flat_spans)
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


def skipped_message(unit: TimeUnit, count: int, num_skipped: int) -> str:
    """The warning for an update skipped at ``count`` (in ``unit``), the ``num_skipped``-th so far."""
    shown = "batch" if unit == TimeUnit.BATCH else "epoch"
    return (
        f"EMA update at {shown} {count} skipped: the training weights contain NaN or Inf ({num_skipped} skipped so far)"
    )
