"""Where a tensor's data lives: plain strided tensors, dense layouts, storage identities, data pointers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "DATA_PTR",
    "STORAGE_USE_COUNT",
    "data_ptrs",
    "is_dense",
    "is_plain",
    "storage_id",
    "storage_key",
]

_PLAIN_TYPES: tuple[type, ...] = (torch.Tensor, nn.Parameter, *((nn.Buffer,) if hasattr(nn, "Buffer") else ()))
#: The reference count of a StorageImpl by its address (absent from some torch builds: plans are then never reused).
STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
DATA_PTR = torch.Tensor.data_ptr


def is_plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a plain strided tensor (no subclass such as DTensor, no sparse layout)."""
    return type(tensor) in _PLAIN_TYPES and tensor.layout == torch.strided


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` fills exactly ``numel`` consecutive elements (contiguous or channels-last)."""
    return (
        tensor.is_contiguous()
        or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))
        or (tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d))
    )


def storage_key(tensor: torch.Tensor) -> int:
    """Where the tensor's storage starts: equal for tensors viewing one buffer."""
    return tensor.untyped_storage().data_ptr()


def storage_id(tensor: torch.Tensor) -> int:
    """The address of the tensor's StorageImpl: valid while some tensor keeps that storage alive."""
    return int(tensor.untyped_storage()._cdata)


def data_ptrs(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """Where each tensor's data starts; None if a tensor has no data pointer (a wrapper subclass such as
    DTensor), in which case a plan reading it is never reused."""
    try:
        return list(map(DATA_PTR, tensors))
    except RuntimeError:
        return None
