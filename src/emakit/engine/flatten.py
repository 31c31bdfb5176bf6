"""Re-point a model's parameters and buffers as views into one flat buffer per (device, dtype).

An EMA update reads the weights and reads and writes the average: pure memory traffic. When the model's
tensors are scattered, every tensor costs a kernel launch (or, on CPU, a trip through the dispatcher), which
for a model of thousands of small tensors costs far more than the arithmetic. :func:`flatten_model_` moves
the tensors of each (device, dtype) into one buffer, in the layout :class:`~emakit.engine.storage.FlatStorage`
uses, so that the EMA of the whole group is one kernel.

What keeps the views (and so the one-kernel update):

- Parameter objects keep their identity (only ``.data`` is re-pointed), so optimizers built before or after
  flattening keep working, and their steps update the views in place.
- ``model.load_state_dict(state)`` copies into the views; so do DDP's broadcasts.
- ``torch.compile``, DDP, autocast and gradient accumulation do not touch the parameters' storage.

What breaks them, after which emakit falls back to the grouped multi-tensor path (never to stale values):

- ``model.to(other_device_or_dtype)``, ``.half()``, ``.cuda()``: each tensor gets its own storage again.
  Call :func:`flatten_model_` again afterwards.
- Replacing a parameter or buffer (``module.weight = nn.Parameter(...)``,
  ``load_state_dict(..., assign=True)``) or assigning ``param.data = ...``.

Trade-offs: the buffers are allocated once and the old storage is freed, so flattening briefly needs a
second copy of the model. ``torch.save(model.state_dict())`` saves each buffer once (the views share it),
but ``safetensors`` refuses tensors that share memory: save clones (``{k: v.clone() ...}``) there.
Parameters that do not require grad go to separate buffers, so that an EMA, which averages only trainable
parameters, can still mirror the trainable buffer exactly.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from emakit.engine.memory import is_dense, is_plain
from emakit.engine.storage import packed_offsets

__all__ = ["flatten_model_", "is_flattened"]

FlatKey = tuple[torch.device, torch.dtype, bool]


def _flattenable(tensor: torch.Tensor) -> bool:
    return (
        is_plain(tensor)
        and tensor.numel() > 0
        and tensor.device.type != "meta"
        and not nn.parameter.is_lazy(tensor)
        and is_dense(tensor)
    )


def _without_aliases(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drop tensors whose memory overlaps another's: copying them apart would untie them."""
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    aliased: set[int] = set()
    for group in by_storage.values():
        spans = sorted(((int(t.storage_offset()), int(t.storage_offset()) + t.numel(), t) for t in group), key=_first)
        reach, owner = -1, None
        for start, end, t in spans:
            if start < reach and owner is not None:
                aliased.update((id(owner), id(t)))
            if end > reach:
                reach, owner = end, t
    return [t for t in tensors if id(t) not in aliased]


def _first(span: tuple[int, int, torch.Tensor]) -> int:
    return span[0]


@torch.no_grad()
def flatten_model_(model: nn.Module) -> dict[FlatKey, torch.Tensor]:
    """Make ``model``'s parameters and buffers views into one zero-padded buffer per group, in place.

    Groups are (device, dtype, frozen): trainable parameters and all buffers share a group, parameters with
    ``requires_grad=False`` get their own. Within a group, tensors are laid out in ``named_parameters`` then
    ``named_buffers`` order with :func:`emakit.engine.storage.packed_offsets`, which :class:`~emakit.engine.storage.FlatStorage`
    also uses; channels-last tensors keep their strides. Left as they are: tied tensors that share memory,
    tensor subclasses (DTensor), lazy, meta, sparse and empty tensors.

    Returns:
        The flat buffers by (device, dtype, frozen). Holding them is optional; they are handy for whole-model
        checks such as ``all(bool(b.isfinite().all()) for b in buffers.values() if b.is_floating_point())``.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    frozen: dict[int, bool] = {}
    ordered: list[torch.Tensor] = []
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in frozen:
            frozen[id(tensor)] = isinstance(tensor, nn.Parameter) and not tensor.requires_grad
            ordered.append(tensor)
    groups: dict[FlatKey, list[torch.Tensor]] = {}
    for tensor in _without_aliases([t for t in ordered if _flattenable(t)]):
        groups.setdefault((tensor.device, tensor.dtype, frozen[id(tensor)]), []).append(tensor)
    buffers: dict[FlatKey, torch.Tensor] = {}
    for (device, dtype, is_frozen), tensors in groups.items():
        offsets, size = packed_offsets([t.numel() for t in tensors])
        flat = torch.zeros(size, dtype=dtype, device=device)
        for tensor, offset in zip(tensors, offsets, strict=True):
            view = flat.as_strided(tensor.shape, tensor.stride(), offset)
            view.copy_(tensor)
            tensor.data = view
        buffers[(device, dtype, is_frozen)] = flat
    return buffers


def is_flattened(model: nn.Module) -> bool:
    """Whether every flattenable tensor of ``model`` shares one buffer with the rest of its group.

    A quick check for tests and logs (it walks the model): False once ``model.to(...)`` or a replaced
    parameter has broken the views.
    """
    storages: dict[tuple[torch.device, torch.dtype, bool], set[int]] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if _flattenable(tensor):
            key = (tensor.device, tensor.dtype, isinstance(tensor, nn.Parameter) and not tensor.requires_grad)
            storages.setdefault(key, set()).add(tensor.untyped_storage().data_ptr())
    return all(len(ptrs) == 1 for ptrs in storages.values())
