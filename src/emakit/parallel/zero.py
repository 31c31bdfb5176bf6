"""DeepSpeed ZeRO-3 parameters: this rank's partition of each, releasing gathered copies, gathering one whole.

Under ZeRO-3 a parameter is an empty placeholder between forwards; ``param.ds_tensor`` is this rank's flat
partition (``ceil(ds_numel / world)`` elements, rank ``r`` holding those from ``r`` times that) and ``ds_shape``
its whole shape. The last ranks' partitions end in padding that DeepSpeed leaves uninitialised (any bits, NaN
included), so "the partition" here is the part holding elements of the parameter, possibly empty. The
EMA of such a model keeps those partitions only, read and written in place here with no communication, the
analogue of :func:`emakit.parallel.sharding.local_tensor` for FSDP2's DTensors. Nothing here imports
DeepSpeed: a ZeRO-3 parameter is recognised by the attributes DeepSpeed gives it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from emakit._compat import all_gather_single

__all__ = [
    "check_partitions",
    "gather_partition",
    "is_zero3_model",
    "is_zero3_param",
    "master_partition",
    "partition",
    "refuse_snapshots",
    "release_gathered",
    "zero3_parameters",
]


def is_zero3_param(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter partitioned by DeepSpeed ZeRO-3 (it has ``ds_tensor`` and ``ds_shape``)."""
    return getattr(tensor, "ds_tensor", None) is not None and hasattr(tensor, "ds_shape")


def is_zero3_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is partitioned by ZeRO-3 (``deepspeed.initialize`` with stage 3)."""
    return any(is_zero3_param(p) for p in model.parameters())


def _held(param: torch.Tensor) -> int:
    """How many elements of ``param`` this rank's partition holds (the rest of ``ds_tensor`` is padding)."""
    size = param.ds_tensor.numel()  # type: ignore[attr-defined]
    rank = dist.get_rank(getattr(param, "ds_process_group", None))
    return max(0, min(size, int(param.ds_numel) - rank * size))  # type: ignore[attr-defined]


def partition(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's flat partition of a ZeRO-3 parameter without its padding (a view: writes reach the model),
    else ``tensor``."""
    if not is_zero3_param(tensor):
        return tensor
    return tensor.ds_tensor.narrow(0, 0, _held(tensor))  # type: ignore[attr-defined]


def master_partition(tensor: torch.Tensor) -> torch.Tensor | None:
    """The fp32 master of this rank's partition of ``tensor`` that ZeRO-3's optimizer steps (a view of its flat
    fp32 group, laid out as ``ds_tensor``), or None: not a trainable ZeRO-3 parameter, or the optimizer keeps
    its states offloaded (on the CPU or NVMe, where reading it every update would copy or swap it in).

    The optimizer writes the master and then copies it into ``ds_tensor`` (rounded to the model's dtype):
    for an fp32 model the two are equal, for a bf16/fp16 model the master is the precise weight.
    """
    optimizer = getattr(tensor, "_z3_optimizer", None)
    if optimizer is None or not tensor.requires_grad or getattr(optimizer, "offload_optimizer", True):
        return None
    master = optimizer.get_local_fp32_param(tensor)
    part = tensor.ds_tensor  # type: ignore[attr-defined]
    if not isinstance(master, torch.Tensor) or master.shape != part.shape or master.device != part.device:
        return None
    return master.narrow(0, 0, _held(tensor))


def zero3_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s ZeRO-3 parameters by name, tied ones under each of their names (empty for other models)."""
    return {name: p for name, p in model.named_parameters(remove_duplicate=False) if is_zero3_param(p)}


def release_gathered(model: nn.Module) -> None:
    """Free the whole copies ZeRO-3 keeps of gathered parameters, so the next forward gathers the partitions.

    An eval forward (and a persistent parameter, below ``stage3_param_persistence_threshold``) leaves
    parameters gathered; a forward would then use those copies, not the partitions. Writing new values into
    the partitions (swapping the EMA in or out) must be followed by this. Local: no communication.
    """
    for p in model.parameters():
        if not is_zero3_param(p):
            continue
        status = getattr(p.ds_status, "name", str(p.ds_status))  # type: ignore[attr-defined]
        if status == "NOT_AVAILABLE":
            continue
        if status == "INFLIGHT" or p.ds_active_sub_modules:  # type: ignore[attr-defined]
            raise RuntimeError(
                f"a ZeRO-3 parameter of shape {tuple(p.ds_shape)} is in use by a running forward "  # type: ignore[attr-defined]
                "or gather: swap the EMA weights in or out between forwards, not inside one"
            )
        p.partition()  # type: ignore[attr-defined]


def gather_partition(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a CPU copy, ``like``'s shape) of which ``part`` is this rank's partition (as
    :func:`partition` gives it), laid out as ``like``'s (a ZeRO-3 parameter). A collective over ``like``'s process group: every rank must call it."""
    group = getattr(like, "ds_process_group", None)
    size = like.ds_tensor.numel()  # type: ignore[attr-defined]
    piece = part.new_zeros(size)  # the partitions padded alike, as all_gather needs them
    piece[: part.numel()] = part
    padded = part.new_empty(dist.get_world_size(group) * size)
    all_gather_single(padded, piece, group)
    whole = padded[: int(like.ds_numel)].view(like.ds_shape)  # type: ignore[attr-defined]
    return whole.cpu() if whole.device.type != "cpu" else whole


def refuse_snapshots() -> None:
    """ValueError for snapshots of a ZeRO-3 model: post-hoc snapshots are not written partition by partition (a
    snapshot folder of plain tensors would keep one rank's partitions only)."""
    raise ValueError(
        "snapshot_folder is not supported for a DeepSpeed ZeRO-3 model: each rank holds only its partitions of "
        "the average, which the snapshot files cannot hold yet. Leave snapshot_folder=None (export the EMA "
        "with emakit.export_ema_weights), or train with ZeRO stage 0-2"
    )


def check_partitions(state: Mapping[str, object], partitions: Mapping[str, torch.Tensor], what: str) -> None:
    """ValueError if ``state`` holds partitions of another size than ``partitions`` (this rank's): it was saved
    with another number of ranks, which a partition-local average cannot be resumed on."""
    for name, mine in partitions.items():
        saved = state.get(name)
        if isinstance(saved, torch.Tensor) and saved.dim() == 1 and saved.numel() != mine.numel():
            world = dist.get_world_size() if dist.is_initialized() else 1
            raise ValueError(
                f"{what}: tensor {name!r} holds a ZeRO-3 partition of {saved.numel()} elements, this rank's has "
                f"{mine.numel()} ({world} ranks): the state was saved with another number of ranks. A ZeRO-3 EMA "
                "resumes only on as many ranks as it was saved with; to change it, export the EMA with "
                "emakit.export_ema_weights and start a new EMA from those weights"
            )
