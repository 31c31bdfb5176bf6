"""Which tensors pair up, and which are averaged: canonical names, where a named tensor lives, its kind.

Tensors are paired by *canonical name*: the name with the wrappers' prefixes removed (``module.`` from
DistributedDataParallel/DataParallel, ``_orig_mod.`` from ``torch.compile``, and the internal path
components of FSDP1 and activation-checkpoint wrappers), so a wrapped model and a plain copy pair up.
Floating and complex tensors are averaged; integer and bool tensors (BatchNorm's ``num_batches_tracked``,
step counters) are copied, because an average of counters truncated back to an integer is meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Slot", "canonical_name", "is_averaged", "named_tensors", "tensor_slots", "unwrap_model"]

_LEADING_WRAPPERS = ("module.", "_orig_mod.")
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """Return ``name`` without the prefixes that DDP, DataParallel, torch.compile and FSDP1 add."""
    if "mod" not in name:  # every wrapper's path component contains it; most names are left as they are
        return name
    for inner in _INNER_WRAPPERS:
        name = name.replace(inner, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_WRAPPERS:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = (
            getattr(model, "module", None)
            if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
            else None
        )
        if inner is None and type(model).__name__ == "OptimizedModule":
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


Slot = tuple[dict, str]


def tensor_slots(model: nn.Module, names: Sequence[str]) -> list[Slot]:
    """Where each named tensor of ``model`` lives: ``(module._parameters or module._buffers, key)``.

    Reading ``slot[0][slot[1]]`` at use time sees tensors that were replaced since (``model.to()`` replaces
    buffers), at the cost of one dict lookup per tensor instead of a walk over all modules.
    """
    index: dict[str, Slot] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None:
                    continue
                name = canonical_name(f"{module_name}.{key}" if module_name else key)
                index.setdefault(name, (table, key))
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"model has no tensor named {missing[0]!r}")
    return [index[n] for n in names]


def named_tensors(
    model: nn.Module, *, trainable_only: bool = False, include_buffers: bool = True
) -> dict[str, torch.Tensor]:
    """Parameters (optionally only trainable ones) and buffers of ``model`` under canonical names.

    Tied parameters appear once. Two tensors whose names collide after canonicalisation raise ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    pairs: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only
    ]
    if include_buffers:
        pairs.extend(model.named_buffers())
    for raw, tensor in pairs:
        name = canonical_name(raw)
        if name in out:
            raise ValueError(f"model has two tensors named {name!r} once wrapper prefixes are removed (one is {raw!r})")
        out[name] = tensor
    return out


def is_averaged(tensor: torch.Tensor) -> bool:
    """Whether a tensor is averaged (floating or complex) rather than copied (integer, bool)."""
    return tensor.is_floating_point() or tensor.is_complex()
