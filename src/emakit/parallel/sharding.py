"""DTensor helpers for sharded (FSDP2) models: find the local shard, rebuild a DTensor around one, reshard.

The EMA of a sharded model keeps this rank's shards only and updates them with no communication; these
helpers are all it needs. torch.distributed.tensor (slow to import) is only imported once a DTensor exists.
"""

from __future__ import annotations

import torch
from torch import nn

from emakit._compat import dtensor_type, fsdp_module_type

__all__ = ["gathered", "is_sharded_model", "local_tensor", "reshard_model", "sharded_like"]


def _dtensor_type() -> type | None:
    # No DTensor can exist before torch has loaded the class; emakit._compat checks without importing it.
    return dtensor_type()


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded by FSDP2 or another DTensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its memory), or ``tensor`` itself if it is not one."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        local = getattr(tensor, "_local_tensor", None)
        return local if isinstance(local, torch.Tensor) else tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def sharded_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard, not copied) as a DTensor sharded like ``like``; ``local`` if ``like`` is plain."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(like, dtensor):
        return local
    return dtensor.from_local(  # type: ignore[attr-defined]
        local,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def reshard_model(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state (a forward in eval mode leaves the root unsharded).

    Reading or writing parameter shards is only meaningful while the sharded parameters are registered.
    """
    fsdp_module = fsdp_module_type()
    if fsdp_module is None:  # FSDP2 was never loaded, so nothing is sharded by it
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of ``tensor``; a DTensor is gathered first (a collective: every rank must call this)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        tensor = tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor.detach().cpu().clone()
