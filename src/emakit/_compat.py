"""Where torch keeps what emakit uses, across the torch releases emakit supports (docs/versions.md).

torch 2.4 and 2.5 keep FSDP2 (``fully_shard``, ``FSDPModule``) under ``torch.distributed._composable.fsdp``, for
CUDA only; 2.6 made it public as ``torch.distributed.fsdp``. On CPU, 2.6 cannot run it and 2.7-2.8 train a parameter
smaller than the world size differently from one process; 2.9 passes emakit's two-rank tests. So emakit shards
models (``parallelism='fsdp'``) from :data:`FSDP2_TORCH` on, and recognises models sharded by any of them. DTensor lives in ``torch.distributed._tensor`` in 2.4 and in
``torch.distributed.tensor`` from 2.5 on. ``torch._foreach_lerp_`` takes one weight per tensor pair only in
newer releases. Gathering into one tensor is ``all_gather_single`` in newer releases (which deprecate
``all_gather_into_tensor``). Every such difference is answered here, once, so that the rest of emakit names no torch version.

Nothing here imports torch.distributed's submodules (slow to import) until a caller needs them.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "FOREACH_LERP_PER_TENSOR",
    "FSDP2_TORCH",
    "TORCH_VERSION",
    "all_gather_single",
    "dtensor_class",
    "dtensor_type",
    "fsdp_module_type",
    "fully_shard_function",
]


def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


#: The installed torch's (major, minor) release, e.g. ``(2, 5)``.
TORCH_VERSION = _release(torch.__version__)

#: Whether ``torch._foreach_lerp_(dst, src, [w0, w1, ...])`` accepts one Python float weight per tensor pair.
#: Without it, several averages with different weights need one multi-tensor call per weight.
FOREACH_LERP_PER_TENSOR = "ScalarList" in torch.ops.aten._foreach_lerp_.overloads()

#: The first torch whose FSDP2 (``fully_shard``) emakit shards with: public API, and correct on CPU as on CUDA.
FSDP2_TORCH = (2, 9)

# The public home first, then the older private one.
_DTENSOR_HOMES = ("torch.distributed.tensor", "torch.distributed._tensor")
_FSDP2_HOMES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")


def _loaded(homes: tuple[str, ...], name: str) -> Any:
    for home in homes:
        module = sys.modules.get(home)
        found = getattr(module, name, None) if module is not None else None
        if found is not None:
            return found
    return None


def _imported(homes: tuple[str, ...], name: str) -> Any:
    for home in homes:
        try:
            found = getattr(importlib.import_module(home), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise ImportError(f"torch {torch.__version__} has no {name} in any of {', '.join(homes)}")


def dtensor_type() -> type | None:
    """The DTensor class if torch has loaded it, else None (then no DTensor exists); never imports it."""
    found = _loaded(_DTENSOR_HOMES, "DTensor")
    return found if isinstance(found, type) else None


def dtensor_class() -> type:
    """The DTensor class, imported from wherever this torch keeps it."""
    found = _imported(_DTENSOR_HOMES, "DTensor")
    assert isinstance(found, type)
    return found


def all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Any = None) -> None:
    """Every rank's ``tensor`` (all the same size) gathered into ``output``, in rank order: a collective."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def fsdp_module_type() -> type[Any] | None:
    """FSDP2's ``FSDPModule`` class if torch has loaded FSDP2, else None (then no model is sharded by it)."""
    found = _loaded(_FSDP2_HOMES, "FSDPModule")
    return found if isinstance(found, type) else None


def fully_shard_function() -> Callable[..., Any]:
    """FSDP2's ``fully_shard``, from its public home in ``torch.distributed.fsdp``.

    Raises:
        RuntimeError: torch is older than :data:`FSDP2_TORCH`, whose FSDP2 emakit's tests do not pass with.
    """
    if TORCH_VERSION < FSDP2_TORCH:
        raise RuntimeError(
            f"parallelism='fsdp' (FSDP2's fully_shard) needs torch >= {FSDP2_TORCH[0]}.{FSDP2_TORCH[1]}, the first "
            f"whose FSDP2 is public and trains correctly on CPU too; this is torch {torch.__version__}. Upgrade torch, "
            "or use parallelism='ddp'"
        )
    from torch.distributed.fsdp import fully_shard

    return fully_shard
