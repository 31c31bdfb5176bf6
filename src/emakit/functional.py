"""The functional core: EMA arithmetic over tensors paired by name.

Nothing here knows about trainers, events or checkpoints. The update for a floating tensor is

    ema <- smoothing * ema + (1 - smoothing) * model  ==  ema.lerp_(model, 1 - smoothing)

and integer or bool tensors (BatchNorm's ``num_batches_tracked``, step counters) are copied, because an
average of counters truncated back to an integer is meaningless.

Tensors are paired by *canonical name*: the name with the wrappers' prefixes removed (``module.`` from
DistributedDataParallel/DataParallel, ``_orig_mod.`` from ``torch.compile``, and the internal path
components of FSDP1 and activation-checkpoint wrappers), so a wrapped model and a plain copy pair up.
Updates are grouped by (device, dtype) and run as multi-tensor (``torch._foreach_*``) kernels.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "canonical_name",
    "compute_ema",
    "copy_tensors_",
    "is_averaged",
    "lerp_tensors_",
    "named_tensors",
    "tensor_slots",
    "unwrap_model",
    "validate_smoothing",
]

_LEADING_WRAPPERS = ("module.", "_orig_mod.")
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """Return ``name`` without the prefixes that DDP, DataParallel, torch.compile and FSDP1 add."""
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


def validate_smoothing(smoothing: object, name: str = "smoothing") -> float:
    """Return ``smoothing`` as a float after checking it is a real number in [0, 1]."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
    value = float(smoothing)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
    return value


def _group_key(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.device, torch.dtype, torch.device, torch.dtype]:
    return (a.device, a.dtype, b.device, b.dtype)


def _grouped(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    groups: dict[tuple[torch.device, torch.dtype, torch.device, torch.dtype], tuple[list, list]] = {}
    for t, s in zip(targets, sources, strict=True):
        dst, src = groups.setdefault(_group_key(t, s), ([], []))
        dst.append(t)
        src.append(s)
    return groups.values()


@torch.no_grad()
def lerp_tensors_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight: float) -> None:
    """In place, ``t <- t + weight * (s - t)`` for floating tensor pairs, grouped by (device, dtype).

    ``weight`` is ``1 - smoothing``. Pairs may differ in dtype (an fp32 EMA of a bf16 model) or device.
    """
    if weight == 0.0 or not targets:
        return
    if weight == 1.0:
        copy_tensors_(targets, sources)
        return
    for dst, src in _grouped(targets, sources):
        if dst[0].device != src[0].device:
            src = [s.to(dst[0].device, non_blocking=True) for s in src]
        if dst[0].dtype == src[0].dtype:
            torch._foreach_lerp_(dst, src, weight)
        else:
            # lerp needs equal dtypes; mul+add promotes inside the kernel instead of casting a copy.
            torch._foreach_mul_(dst, 1.0 - weight)
            torch._foreach_add_(dst, src, alpha=weight)


@torch.no_grad()
def copy_tensors_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """In place, ``t <- s`` for every pair, grouped so that each group is one multi-tensor copy."""
    for dst, src in _grouped(targets, sources):
        torch._foreach_copy_(dst, src)


def _pair(
    model_tensors: Mapping[str, torch.Tensor], ema_tensors: Mapping[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    missing = [n for n in model_tensors if n not in ema_tensors]
    extra = [n for n in ema_tensors if n not in model_tensors]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is in model but missing from ema_model ({len(missing)} missing)")
    if extra:
        raise ValueError(f"tensor {extra[0]!r} is in ema_model but missing from model ({len(extra)} extra)")
    avg_ema, avg_src, copy_ema, copy_src = [], [], [], []
    for name, src in model_tensors.items():
        dst = ema_tensors[name]
        if dst.shape != src.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(src.shape)} in model and {tuple(dst.shape)} in ema_model"
            )
        if is_averaged(src) and is_averaged(dst):
            avg_ema.append(dst)
            avg_src.append(src)
        elif not is_averaged(src) and not is_averaged(dst):
            copy_ema.append(dst)
            copy_src.append(src)
        else:
            raise ValueError(
                f"tensor {name!r} is {src.dtype} in model and {dst.dtype} in ema_model: "
                "floating tensors must pair with floating tensors, integer with integer"
            )
    return avg_ema, avg_src, copy_ema, copy_src


def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place toward ``model``: ``ema = smoothing * ema + (1 - smoothing) * model``.

    Parameters and buffers are paired by canonical name, so either side may be wrapped in DDP or
    ``torch.compile``. Floating tensors are blended (the EMA may use a wider dtype than the model);
    integer and bool buffers are copied. ``smoothing`` is the fraction of the old average kept per call:
    0 copies the model, 1 leaves the average unchanged.

    Raises:
        ValueError: ``smoothing`` is not a real number in [0, 1]; a tensor is present on one side only;
            shapes differ; or a floating tensor pairs with an integer one.
    """
    weight = 1.0 - validate_smoothing(smoothing)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(ema_model, nn.Module):
        raise TypeError(f"ema_model must be a torch.nn.Module, got {type(ema_model).__name__}")
    avg_ema, avg_src, copy_ema, copy_src = _pair(named_tensors(model), named_tensors(ema_model))
    with torch.no_grad():
        lerp_tensors_(avg_ema, avg_src, weight)
        copy_tensors_(copy_ema, copy_src)
