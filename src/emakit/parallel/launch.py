"""Launching: torchrun detection, the process group (with a timeout), and wrapping a model for DDP or FSDP2."""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from emakit._compat import fully_shard_function
from emakit.parallel.ranks import is_distributed
from emakit.parallel.sharding import is_sharded_model

__all__ = [
    "DEFAULT_TIMEOUT",
    "PARALLELISMS",
    "check_parallelism",
    "init_distributed",
    "launched_by_torchrun",
    "note_peer_failure",
    "prepare_model",
    "resolve_device",
    "resolve_parallelism",
    "shard_model",
]


PARALLELISMS = ("ddp", "fsdp")

#: How long a collective waits for the other ranks before failing the run.
DEFAULT_TIMEOUT = timedelta(minutes=10)

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)."""
    env = os.environ if environ is None else environ
    return all(env.get(name) for name in _TORCHRUN_VARIABLES)


def _env_int(name: str, environ: Mapping[str, str]) -> int:
    value = environ.get(name, "0")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}")
    return number


def _as_timedelta(timeout: float | timedelta, name: str = "dist_timeout") -> timedelta:
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"{name} must be a number of seconds or a datetime.timedelta, got {timeout!r}")
    if not seconds > 0:
        raise ValueError(f"{name} must be greater than 0 seconds, got {timeout!r}")
    return timedelta(seconds=seconds)


def resolve_device(device: torch.device, environ: Mapping[str, str] | None = None) -> torch.device:
    """``device`` with the launch's local GPU for an index-less CUDA device under torchrun (``cuda:LOCAL_RANK``)."""
    env = os.environ if environ is None else environ
    if device.type == "cuda" and device.index is None and launched_by_torchrun(env):
        return torch.device("cuda", _env_int("LOCAL_RANK", env))
    return device


def _destroy_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def init_distributed(device: torch.device, timeout: float | timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group of a ``torchrun`` launch; return whether this process is in a process group.

    A group the caller initialised already is used as it is. Otherwise, under torchrun, the group is
    created with gloo for CPU devices and nccl for CUDA ones, and destroyed at exit. ``timeout`` (seconds
    or a timedelta) bounds every collective: when a rank dies or stops answering, the others fail with a
    timeout error after it instead of waiting forever, and torchrun ends the launch.
    """
    limit = _as_timedelta(timeout)
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed support")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        _env_int(name, os.environ)
    if device.type == "cuda":
        torch.cuda.set_device(resolve_device(device))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=limit)
    atexit.register(_destroy_group)
    return True


_PEER_FAILURE_SIGNS = ("timed out", "connection closed by peer", "connection reset by peer")


def note_peer_failure(error: BaseException, rank: int, world_size: int) -> None:
    """Add a note to the error of a collective that failed because another rank died or stopped answering."""
    text = str(error).lower()
    if world_size > 1 and any(sign in text for sign in _PEER_FAILURE_SIGNS) and hasattr(error, "add_note"):
        error.add_note(
            f"emakit: rank {rank} of {world_size} failed in a collective operation because another rank died or "
            "stopped answering (collectives wait at most Trainer(dist_timeout=...)); the launcher's summary names "
            "the first rank that failed, and that rank's log shows why"
        )


def check_parallelism(parallelism: object) -> str | None:
    """Return ``parallelism`` after checking it is None, ``'ddp'`` or ``'fsdp'``."""
    if parallelism is not None and parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be None, 'ddp' or 'fsdp', got {parallelism!r}")
    return parallelism


def resolve_parallelism(parallelism: str | None, distributed: bool, world_size: int) -> str | None:
    """The parallelism to use: ``parallelism``, or ``'ddp'`` for a multi-process launch that named none.

    Raises:
        ValueError: ``parallelism`` is not None/'ddp'/'fsdp', or it was asked for without a process group.
    """
    check_parallelism(parallelism)
    if parallelism is not None and not distributed:
        raise ValueError(
            f"parallelism={parallelism!r} needs a torch.distributed launch: run under torchrun "
            "(e.g. `torchrun --nproc_per_node=2 train.py`) or initialise a process group first"
        )
    if parallelism is None and distributed and world_size > 1:
        return "ddp"
    return parallelism


def _broadcast_from_rank0(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard_model(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> nn.Module:
    """Shard ``model`` across the ranks with FSDP2's ``fully_shard`` (in place) and return it.

    Every rank starts from rank 0's weights (broadcast first, as DDP does). The whole model is one FSDP
    group; for finer groups (one per block) call ``fully_shard`` yourself before building the Trainer.
    FSDP2 replaces the parameter objects: ``optimizers`` that have no state yet are pointed at the new ones.

    Raises:
        ValueError: an optimizer already has state (it would keep updating the replaced parameters).
    """
    fully_shard = fully_shard_function()

    for opt in optimizers:
        if opt.state:
            raise ValueError(
                "an optimizer with state was given for parallelism='fsdp': sharding replaces the parameters it "
                "holds; create the optimizer after sharding (emakit.distributed.shard_model(model)) or before any step"
            )
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if is_distributed():
        _broadcast_from_rank0(model)
    fully_shard(model)
    sharded = dict(model.named_parameters(remove_duplicate=False))
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [sharded[names[id(p)]] if id(p) in names else p for p in group["params"]]
    return model


def prepare_model(
    model: nn.Module,
    parallelism: str | None,
    device: torch.device,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> nn.Module:
    """Wrap ``model`` for ``parallelism``: DDP, FSDP2 (:func:`shard_model`), or unchanged for None.

    A model the caller already wrapped in DDP or sharded is returned as it is.
    """
    check_parallelism(parallelism)
    if parallelism is None or isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded_model(model):
        return model
    if parallelism == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return shard_model(model, optimizers)
