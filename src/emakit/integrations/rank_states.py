"""Which file of a checkpoint folder holds an averager's state, when each rank holds its own part; writing and
reading it.

Under DeepSpeed ZeRO-3 (:mod:`emakit.parallel.zero`) and FSDP2 (DTensor parameters) an averager's state holds
this rank's partitions or shards of the average only, so every rank writes its own file,
``emakit_ema_rank{r}.pt``, and resumes from it; any other state is whole and one file, written by the saving
rank. A folder written by another number of ranks is refused before the EMA loads anything: the parts would not
fit. The Transformers callback names its files with :func:`state_to_save`/:func:`state_to_load`; a loop of
your own (DeepSpeed's, Accelerate's) calls :func:`save_ema_state`/:func:`load_ema_state` on every rank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from emakit.atomic import atomic_file
from emakit.averaging import Averager
from emakit.checkpoint import read_checkpoint_file
from emakit.engine.naming import named_tensors
from emakit.parallel.ranks import barrier, get_rank, get_world_size
from emakit.parallel.sharding import is_sharded_model, local_tensor, sharded_like
from emakit.parallel.zero import is_zero3_model

__all__ = [
    "PARTITION_STATE_PATTERN",
    "WHOLE_STATE_NAME",
    "expected_states",
    "holds_partitions",
    "load_ema_state",
    "partition_state_name",
    "read_state",
    "save_ema_state",
    "state_to_load",
    "state_to_save",
    "write_state",
]

#: Each rank's state of a partitioned (ZeRO-3) or sharded (FSDP2) average, ``{rank}`` its rank.
PARTITION_STATE_PATTERN = "emakit_ema_rank{rank}.pt"
#: The state of a whole average, written by one rank.
WHOLE_STATE_NAME = "emakit_ema.pt"
_SAVED = re.compile(r"emakit_ema_rank(\d+)\.pt")


def partition_state_name(rank: int) -> str:
    """The file of rank ``rank``'s partitions (or shards) of the average."""
    return PARTITION_STATE_PATTERN.format(rank=rank)


def holds_partitions(averager: Averager) -> bool:
    """Whether ``averager`` (attached) keeps this rank's part of the average only (ZeRO-3 partitions, FSDP2
    shards), so that each rank saves its own state."""
    return is_zero3_model(averager.model) or is_sharded_model(averager.model)


def _layout(averager: Averager) -> str:
    return "ZeRO-3" if is_zero3_model(averager.model) else "FSDP2"


def expected_states(averager: Averager, whole_name: str) -> str:
    """The file names a folder holding ``averager``'s state has, in words (for messages)."""
    if not holds_partitions(averager):
        return whole_name
    world = get_world_size()
    last = f", ..., {partition_state_name(world - 1)}" if world > 2 else ""
    second = f", {partition_state_name(1)}" if world == 2 else last
    return f"{partition_state_name(0)}{second} (one per rank, {_layout(averager)})"


def state_to_save(averager: Averager, folder: Path, whole_name: str, should_save: bool) -> Path | None:
    """The file this rank writes ``averager.state_dict()`` to in ``folder``, or None: every rank its own when
    the average is partitioned or sharded, else ``whole_name`` on the rank that saves (``should_save``)."""
    if holds_partitions(averager):
        return folder / partition_state_name(get_rank())
    return folder / whole_name if should_save else None


def _saved_ranks(folder: Path) -> list[int]:
    found = (_SAVED.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else iter(())
    return sorted(int(m.group(1)) for m in found if m is not None)


def state_to_load(averager: Averager, folder: Path, whole_name: str) -> Path | None:
    """The file this rank restores ``averager`` from, or None when ``folder`` holds no state of it.

    ValueError, before anything is read, when the folder holds per-rank states of another number of ranks
    than this run's, or states of the other kind (partitions for a whole average, or the reverse).
    """
    ranks, world = _saved_ranks(folder), get_world_size()
    partitioned = holds_partitions(averager)
    layout = _layout(averager) if partitioned else "ZeRO-3"
    if ranks and ranks != list(range(world)):
        raise ValueError(
            f"{folder} holds the {layout} EMA partitions of {len(ranks)} rank(s) "
            f"({', '.join(partition_state_name(r) for r in ranks)}), but this run has {world} (the world size: "
            f"torchrun --nproc_per_node times the nodes): a {layout} EMA resumes only on as many ranks as saved it. "
            "Resume with the same number of ranks, or export the EMA (emakit.export_ema_weights, or the "
            "checkpoint's ema_weights.safetensors) and start a new EMA from those weights"
        )
    if ranks and not partitioned:
        raise ValueError(
            f"{folder} holds per-rank EMA partition states ({partition_state_name(0)}, ...) written under DeepSpeed "
            "ZeRO-3 or FSDP2, but this run's model is not partitioned by ZeRO-3 (nor sharded by FSDP2): resume with "
            "the same DeepSpeed ZeRO stage or FSDP2 sharding"
        )
    whole = folder / whole_name
    if partitioned:
        if not ranks and whole.is_file():
            raise ValueError(
                f"{whole} holds a whole EMA written without DeepSpeed ZeRO-3, but this run partitions the model with "
                f"{layout}, whose EMA resumes from per-rank partition states: resume with the same DeepSpeed ZeRO "
                "stage (or the same FSDP2 sharding)"
            )
        return folder / partition_state_name(get_rank()) if ranks else None
    return whole if whole.is_file() else None


def _local(value: Any) -> Any:
    """``value`` with every DTensor replaced by this rank's shard (the per-rank files hold plain tensors)."""
    if isinstance(value, torch.Tensor):
        return local_tensor(value)
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def _as_model_tensors(value: Any, like: dict[str, torch.Tensor], key: Any = None) -> Any:
    """``value`` read from a per-rank file with each shard saved under a sharded tensor's name (and of its
    shard's shape) as a DTensor again, sharded like it: what :meth:`~emakit.Averager.load_state_dict` checks."""
    if isinstance(value, torch.Tensor):
        model = like.get(key) if isinstance(key, str) else None
        if model is not None and local_tensor(model) is not model and value.shape == local_tensor(model).shape:
            return sharded_like(value, model)
        return value
    if isinstance(value, dict):
        return {k: _as_model_tensors(v, like, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_model_tensors(v, like) for v in value)
    return value


def save_ema_state(
    averager: Averager, folder: str | os.PathLike[str], *, overwrite: bool = False, whole_name: str = WHOLE_STATE_NAME
) -> Path | None:
    """Write ``averager.state_dict()`` into ``folder`` for :func:`load_ema_state`; every rank calls it.

    A partitioned (ZeRO-3) or sharded (FSDP2) average: each rank writes ``emakit_ema_rank{r}.pt``, its own
    part; a whole one: rank 0 writes ``whole_name``. No collective but a final barrier; ``folder`` is created.
    An existing file is replaced only with ``overwrite``. Returns the file this rank wrote, or None.
    """
    target = state_to_save(averager, Path(folder), whole_name, should_save=get_rank() == 0)
    if target is not None:
        write_state(averager, target, overwrite=overwrite)
    barrier()
    return target


def write_state(averager: Averager, path: Path, *, overwrite: bool) -> None:
    """Write ``averager.state_dict()`` to ``path`` atomically, DTensors as this rank's shards (plain tensors,
    which ``weights_only`` loading reads and :meth:`~emakit.Averager.load_state_dict` takes as the shards)."""
    with atomic_file(path, overwrite=overwrite, what="EMA state") as f:
        torch.save(_local(averager.state_dict()), f)


def load_ema_state(averager: Averager, folder: str | os.PathLike[str], *, whole_name: str = WHOLE_STATE_NAME) -> Path:
    """Restore ``averager`` (attached) from the state :func:`save_ema_state` wrote into ``folder``: this rank's
    file. FileNotFoundError naming the expected files when there is none; ValueError for a folder written by
    another number of ranks or another layout (before anything is read). Returns the file read."""
    path = state_to_load(averager, Path(folder), whole_name)
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no EMA state: expected {expected_states(averager, whole_name)}, as save_ema_state writes"
        )
    read_state(averager, path)
    return path


def read_state(averager: Averager, path: Path) -> None:
    """Restore ``averager`` from the file :func:`write_state` wrote (``weights_only``; a damaged file is named
    as such), this rank's shards made DTensors again for an FSDP2 model."""
    state = read_checkpoint_file(path)
    if is_sharded_model(averager.model):
        state = _as_model_tensors(state, named_tensors(averager.model))
    averager.load_state_dict(state)
