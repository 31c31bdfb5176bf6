"""The functional API: :func:`compute_ema`, the EMA update for any training loop, and the names it is built on.

The update for a floating tensor is

    ema <- smoothing * ema + (1 - smoothing) * model  ==  ema.lerp_(model, 1 - smoothing)

and integer or bool tensors (BatchNorm's ``num_batches_tracked``, step counters) are copied, because an
average of counters truncated back to an integer is meaningless. Tensors are paired by canonical name, so a
wrapped model (DDP, ``torch.compile``, FSDP1) and a plain copy pair up.

How an update runs lives in :mod:`emakit.engine`: the pairing (:mod:`~emakit.engine.pairing`), the
prepared update (:mod:`~emakit.engine.plan`) and its kernels (:mod:`~emakit.engine.kernels`).
"""

from __future__ import annotations

from torch import nn

from emakit.engine.kernels import validate_smoothing
from emakit.engine.pairing import update_kept

__all__ = ["compute_ema"]


def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place toward ``model``: ``ema = smoothing * ema + (1 - smoothing) * model``.

    Parameters and buffers are paired by canonical name, so either side may be wrapped in DDP or
    ``torch.compile``. Floating tensors are blended (the EMA may use a wider dtype than the model);
    integer and bool buffers are copied. ``smoothing`` is the fraction of the old average kept per call:
    0 copies the model, 1 leaves the average unchanged.

    The pairing is made on the first call for two models and kept (weakly: it never keeps a model alive):
    later calls check, far more cheaply than pairing again, that neither model changed (a parameter
    replaced or re-pointed, ``model.to(...)``, a module added or removed; see :class:`~emakit.engine.plan.UpdatePlan`) and run
    one multi-tensor kernel per (device, dtype) group. When both models are flattened
    (:func:`emakit.engine.flatten.flatten_model_`) with the same layout, each group is one kernel over one
    buffer. Wrapping a model later (DDP, ``torch.compile``) passes another object, which is paired afresh.

    Raises:
        ValueError: ``smoothing`` is not a real number in [0, 1]; ``model`` and ``ema_model`` are the same
            module (or wrap it); a tensor is present on one side only; shapes differ; or a floating tensor
            pairs with an integer one.
        TypeError: ``model`` or ``ema_model`` is not a ``torch.nn.Module``.
    """
    if type(smoothing) is not float or not 0.0 <= smoothing <= 1.0:  # the common case checked in two steps
        smoothing = validate_smoothing(smoothing)
    update_kept(model, ema_model, 1.0 - smoothing)
