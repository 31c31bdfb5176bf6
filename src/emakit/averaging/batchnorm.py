"""BatchNorm statistics of an average: one pass of the averaged weights over training data.

Averaging the weights does not average what BatchNorm would measure with them, so SWA (and any average whose
``bn_update`` is on) recomputes the running statistics once its window closes, as torch's
``torch.optim.swa_utils.update_bn`` does: statistics reset, momentum None (an equal-weight mean over the
batches), the model in train mode. The random state of python, numpy, torch and the loader's own generators is
put back afterwards, so the pass changes nothing of training that follows.

A teacher (``ema.ema_model`` run every step) chooses its normalisation: running statistics in eval mode (the
default; with ``buffers='average'`` they are the EMA of the student's, with ``'copy'`` the student's own, with
``'share'`` the student's tensors themselves), or, as BYOL's target network, each batch's own statistics with
the running ones untouched: :func:`batch_statistics`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from emakit.averaging.tracked import TrackedModel
from emakit.engine.storage import FlatStorage
from emakit.rng import capture_rng, loader_generators, restore_rng

__all__ = ["batch_norms", "batch_statistics", "default_bn_forward", "recompute"]


def default_bn_forward(model: nn.Module, batch: Any) -> None:
    """Run ``model`` on a batch as torch's ``update_bn`` does: the first element of a list or tuple."""
    if isinstance(batch, Mapping):
        raise TypeError(
            f"update_bn: the loader's batches are dicts (keys {sorted(batch)[:4]}), which the default forward "
            "cannot split into inputs: pass forward=lambda model, batch: model(**batch) (bn_forward= in the "
            "callbacks), or a function that runs one batch"
        )
    inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
    device = next((t.device for t in model.parameters()), None)
    if device is not None and isinstance(inputs, torch.Tensor):
        inputs = inputs.to(device)
    model(inputs)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute(
    model: nn.Module,
    loader: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    average: FlatStorage,
    tracked: TrackedModel,
) -> None:
    """Recompute the BatchNorm statistics of ``model`` (holding the averaged weights) over ``loader`` and store
    them in ``average``; refuses a loader that yields no batch (the statistics would be the reset ones)."""
    norms = batch_norms(model)
    if not norms:
        return
    run = default_bn_forward if forward is None else forward
    generators = loader_generators(loader)
    drawn = capture_rng(generators)
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    batches = 0
    try:
        for batch in loader:
            run(model, batch)
            batches += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
        restore_rng(drawn, generators)
    if batches == 0:
        raise ValueError(
            "update_bn: the loader yielded no batch (empty, or an iterator already exhausted), so BatchNorm would "
            "keep reset statistics (mean 0, variance 1); pass a loader, or a list of batches, that yields data"
        )
    buffers = {id(b) for m in norms for b in m.buffers(recurse=False)}
    tensors = average.state_dict()
    for name, live in zip(tracked.names, tracked.live(model), strict=True):
        if id(live) in buffers and name in tensors:
            tensors[name].copy_(live)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s BatchNorm layers normalise with each batch's own statistics, as in train
    mode, and leave their running statistics (the average's, for ``ema.ema_model``) as they are; yields ``model``.

    Other layers keep their mode (a teacher's dropout stays off). The running statistics are unregistered for
    the block's duration (BatchNorm then uses the batch's), and put back on leaving, also through an exception.
    """
    norms = batch_norms(model)
    saved = [(m, m._buffers["running_mean"], m._buffers["running_var"], m.training) for m in norms]
    for m in norms:
        m._buffers["running_mean"] = m._buffers["running_var"] = None
        m.training = False  # no running statistic and no count is updated
    try:
        yield model
    finally:
        for m, mean, var, training in saved:
            m._buffers["running_mean"], m._buffers["running_var"] = mean, var
            m.training = training
