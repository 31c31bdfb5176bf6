"""Rank queries and the one collective the EMA needs; all work (as no-ops) without a process group."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["all_reduce_mean", "all_reduce_sum", "barrier", "get_rank", "get_world_size", "is_distributed", "meet"]


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (``values`` unchanged without a process group)."""
    if not is_distributed() or get_world_size() == 1:
        return [float(v) for v in values]
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return [float(v) for v in totals.tolist()]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over the ranks, in place (``tensor`` itself without a process group)."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


_meetings = itertools.count()


def meet(what: str, timeout_s: float, *, error: Exception | None = None, hint: str = "") -> None:
    """Wait until every rank has reached this call, at most ``timeout_s`` seconds, then raise any rank's ``error``.

    A call every rank must make (a gather) that only some make would hang without a word; this meeting, held
    through the process group's store (no tensor, any backend), fails instead, naming ``what``. Ranks meet in
    the order of their calls, as collectives do; ``hint`` (what to do) ends the error. ``error``: what this rank
    refuses the call with; it is raised here, and on the other ranks as a ValueError with its message, so that
    none waits in a collective the others left. Without a process group only ``error`` is raised.
    """
    if not is_distributed() or get_world_size() == 1:
        if error is not None:
            raise error
        return
    store = dist.distributed_c10d._get_default_store()
    world = get_world_size()
    key = f"emakit/meet/{next(_meetings)}"
    if error is not None:
        store.set(f"{key}/error", str(error))
    arrived = store.add(key, 1)
    if arrived > world:  # the others stopped waiting for this rank: they raised the timeout error below
        raise RuntimeError(
            f"{what}: this rank reached it after the others had stopped waiting for it; every rank must call "
            f"it, at the same point. {hint}".rstrip()
        )
    if arrived == world:
        store.set(f"{key}/all", "1")
    try:
        store.wait([f"{key}/all"], timedelta(seconds=timeout_s))
    except Exception as e:  # the store's own timeout error (its type differs between torch releases)
        arrived = store.add(key, world + 1) - (world + 1)  # ranks arriving from now on are told so
        if arrived < world:
            raise RuntimeError(
                f"{what}: only {arrived} of {world} ranks reached it within {timeout_s:g} s; every rank must "
                f"call it. {hint}".rstrip()
            ) from e
    if error is not None:
        raise error
    if store.check([f"{key}/error"]):
        raise ValueError(store.get(f"{key}/error").decode())
