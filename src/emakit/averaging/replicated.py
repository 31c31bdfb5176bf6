"""Buffers every rank keeps for itself under FSDP2: one rule for what is written, each rank's own for a resume.

FSDP2 shards parameters (DTensors) but leaves buffers as plain tensors on every rank and never synchronises
them, so each rank's BatchNorm running statistics follow its own batches, and each rank's average of them
differs. Wherever emakit writes the average (exports, published model states, the averager's state in
checkpoints, snapshots) a replicated floating buffer is written as its mean over all ranks
(:func:`mean_over_ranks`): one value, whichever rank a distributed checkpoint keeps. Integer buffers
(``num_batches_tracked``) count forward passes, equal on every rank, and are written as they are.

A resume continues each rank's own sequence: :func:`rank_entry` keeps, under ``rank_buffers["rank{r}"]`` of
the averager's state, this rank's own values of those buffers, in each average and in the training model, with
the world size. On the same world size :func:`own_averages` and :func:`own_training` give them back; on another
world size there is no rank to continue, and every rank resumes from what the checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from emakit.averaging.tracked import TrackedModel
from emakit.engine.naming import named_tensors, unwrap_model
from emakit.engine.storage import FlatStorage
from emakit.parallel.ranks import all_reduce_mean, get_rank, get_world_size, meet
from emakit.parallel.sharding import local_tensor

__all__ = [
    "ARRIVAL_TIMEOUT_S",
    "RANK_KEY",
    "keep_own",
    "mean_over_ranks",
    "own_averages",
    "own_kept",
    "own_training",
    "rank_entry",
    "replicated_buffers",
    "written",
]

#: The averager state's entry holding each rank's own values of the replicated buffers.
RANK_KEY = "rank_buffers"
#: How long the ranks wait for each other before the mean (a call made on some ranks only fails, not hangs).
ARRIVAL_TIMEOUT_S = 120.0


def replicated_buffers(tracked: TrackedModel) -> list[str]:
    """The followed model's floating buffers that each rank holds whole (plain tensors of a model sharded by FSDP2
    or another DTensor parallelism), when more than one rank runs; in the model's order, alike on every rank."""
    model = tracked.model
    if model is None or not tracked.sharded or tracked.zero3 or get_world_size() == 1:
        return []
    buffers = {id(b) for b in unwrap_model(model).buffers()}
    return [
        name
        for name, t in named_tensors(model).items()
        if id(t) in buffers and t.is_floating_point() and local_tensor(t) is t
    ]


def mean_over_ranks(tensors: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``tensors`` with each of ``names`` it holds replaced by its mean over the ranks (a new tensor, same dtype).

    A collective (one all-reduce for all of them): every rank calls it with the same names, within
    :data:`ARRIVAL_TIMEOUT_S` seconds of the others, or each gets an error naming the call. Summed in float64.
    """
    chosen = [name for name in names if name in tensors]
    out = dict(tensors)
    if not chosen:
        return out
    meet(
        "the mean over ranks of the BatchNorm buffers FSDP2 leaves unsynchronised (written by ema.state_dict(), "
        "published_model_state, exports and snapshots)",
        ARRIVAL_TIMEOUT_S,
        hint="Under FSDP2 call these on every rank, not inside `if rank == 0:`",
    )
    flat = torch.cat([tensors[name].detach().reshape(-1).to(torch.float64) for name in chosen])
    flat = all_reduce_mean(flat)
    offset = 0
    for name in chosen:
        tensor = tensors[name]
        out[name] = flat[offset : offset + tensor.numel()].view(tensor.shape).to(tensor.dtype)
        offset += tensor.numel()
    return out


def written(tracked: TrackedModel, averages: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """``averages`` (this rank's, by name) as they are written: the model's tensors (DTensors for a sharded model),
    the replicated buffers as their mean over the ranks (a collective under FSDP2)."""
    names = replicated_buffers(tracked)
    return [mean_over_ranks(tracked.as_model_tensors(average), names) for average in averages]


def rank_entry(
    tracked: TrackedModel, storages: Sequence[FlatStorage] | None, backup: Mapping[str, torch.Tensor] | None
) -> dict[str, Any] | None:
    """This rank's own values of the replicated buffers, ``{"rank{r}": {...}}``, for the averager's state: in each
    average (``storages``, None before the start) and in the training model (from ``backup``, by tracked name,
    while the average is swapped in); None when there are none."""
    names = replicated_buffers(tracked)
    if not names:
        return None
    assert tracked.model is not None
    model = named_tensors(tracked.model)
    # copies: a loader filling the state in place (DCP) must not write them into the model's own buffers
    training = {n: t.detach().clone() for n, t in {**model, **(backup or {})}.items() if n in names}
    averages = [storage.state_dict() for storage in storages or []]
    own = {
        "world_size": get_world_size(),
        "averages": [{n: a[n] for n in names if n in a} for a in averages],
        "training": training,
    }
    return {f"rank{get_rank()}": own}


def _own(state: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """This rank's entry of ``state``'s :data:`RANK_KEY`, if it was saved at this world size."""
    entries = state.get(RANK_KEY)
    entry = entries.get(f"rank{get_rank()}") if isinstance(entries, Mapping) else None
    if not isinstance(entry, Mapping) or entry.get("world_size") != get_world_size():
        return None
    return entry


def own_averages(state: Mapping[str, Any], saved: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """``saved`` (the state's averages, this rank's tensors) with this rank's own replicated buffers in place of
    their mean, when the state holds them for this rank at this world size."""
    entry = _own(state)
    if entry is None:
        return saved
    owned = entry.get("averages")
    if not isinstance(owned, Sequence) or len(owned) != len(saved):
        raise ValueError(f"EMA state's {RANK_KEY!r} must hold one dict per average ({len(saved)}), got {owned!r}")
    return [_substituted(average, own) for average, own in zip(saved, owned, strict=True)]


def keep_own(
    state: dict[str, Any], key: str, tensors: Mapping[str, torch.Tensor] | None, tracked: TrackedModel
) -> None:
    """Add this rank's own replicated buffers of ``tensors`` (a schedule's kept weights, such as BEMA's
    ``theta_0``) to ``state``'s :data:`RANK_KEY` entry under ``key``; nothing if the state has no such entry."""
    entries = state.get(RANK_KEY)
    entry = entries.get(f"rank{get_rank()}") if isinstance(entries, dict) else None
    if isinstance(entry, dict) and tensors is not None:
        entry[key] = {n: tensors[n] for n in replicated_buffers(tracked) if n in tensors}


def own_kept(state: Mapping[str, Any], key: str, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``saved`` (what :func:`keep_own` kept under ``key``, as read from the shared entry) with this rank's own
    replicated buffers, when the state holds them for this rank at this world size."""
    entry = _own(state)
    own = entry.get(key) if entry is not None else None
    return saved if not isinstance(own, Mapping) else _substituted(saved, own)


def _substituted(saved: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, tensor in own.items():
        if name in saved and tuple(tensor.shape) != tuple(saved[name].shape):
            raise ValueError(
                f"EMA state's {RANK_KEY!r}: buffer {name!r} has shape {tuple(tensor.shape)}, the average's "
                f"{tuple(saved[name].shape)}"
            )
    return {**saved, **{n: t for n, t in own.items() if n in saved}}


def own_training(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's own training values of the replicated buffers saved in ``state`` (the averager's), by canonical
    name; empty when it holds none for this rank at this world size. Adapters load them after the checkpoint's
    model weights, whose replicated buffers a distributed checkpoint keeps from one rank only."""
    entry = _own(state)
    training = entry.get("training") if entry is not None else None
    return dict(training) if isinstance(training, Mapping) else {}
