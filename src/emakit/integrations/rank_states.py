"""Which file of a front end's checkpoint folder holds an averager's state, when each rank holds its own part.

Under DeepSpeed ZeRO-3 an averager's state holds this rank's partitions of the average only
(:mod:`emakit.parallel.zero`), so every rank writes its own file, ``emakit_ema_rank{r}.pt``, and resumes from it;
any other state is whole and one file, written by the saving rank. A folder written by another number of ranks
is refused before anything is loaded: the partitions would not fit. The front ends (Transformers, Accelerate)
write the files; this module only names them.
"""

from __future__ import annotations

import re
from pathlib import Path

from emakit.averaging import Averager
from emakit.parallel.ranks import get_rank, get_world_size
from emakit.parallel.zero import is_zero3_model

__all__ = ["PARTITION_STATE_PATTERN", "holds_partitions", "partition_state_name", "state_to_load", "state_to_save"]

#: Each rank's state under ZeRO-3, ``{rank}`` its rank.
PARTITION_STATE_PATTERN = "emakit_ema_rank{rank}.pt"
_SAVED = re.compile(r"emakit_ema_rank(\d+)\.pt")


def partition_state_name(rank: int) -> str:
    """The file of rank ``rank``'s partitions of the average."""
    return PARTITION_STATE_PATTERN.format(rank=rank)


def holds_partitions(averager: Averager) -> bool:
    """Whether ``averager`` (attached) keeps this rank's ZeRO-3 partitions, so that each rank saves its own state."""
    return is_zero3_model(averager.model)


def state_to_save(averager: Averager, folder: Path, whole_name: str, should_save: bool) -> Path | None:
    """The file this rank writes ``averager.state_dict()`` to in ``folder``, or None: every rank its own under
    ZeRO-3, else ``whole_name`` on the rank that saves (``should_save``)."""
    if holds_partitions(averager):
        return folder / partition_state_name(get_rank())
    return folder / whole_name if should_save else None


def _saved_ranks(folder: Path) -> list[int]:
    found = (_SAVED.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else iter(())
    return sorted(int(m.group(1)) for m in found if m is not None)


def state_to_load(averager: Averager, folder: Path, whole_name: str) -> Path | None:
    """The file this rank restores ``averager`` from, or None when ``folder`` holds no state of it.

    ValueError, before anything is read, when the folder holds ZeRO-3 partition states of another number of
    ranks than this run's, or states of the other kind (partitions for a whole average, or the reverse).
    """
    ranks, world = _saved_ranks(folder), get_world_size()
    partitioned = holds_partitions(averager)
    if ranks and ranks != list(range(world)):
        raise ValueError(
            f"{folder} holds the ZeRO-3 EMA partitions of {len(ranks)} rank(s) "
            f"({', '.join(partition_state_name(r) for r in ranks)}), but this run has {world} (the world size: "
            "torchrun --nproc_per_node times the nodes): a ZeRO-3 EMA resumes only on as many ranks as saved it. "
            "Resume with the same number of ranks, or export the EMA (emakit.export_ema_weights, or the "
            "checkpoint's ema_weights.safetensors) and start a new EMA from those weights"
        )
    if ranks and not partitioned:
        raise ValueError(
            f"{folder} holds per-rank EMA partition states ({partition_state_name(0)}, ...) written under DeepSpeed "
            "ZeRO-3, but this run's model is not partitioned by ZeRO-3: resume with the same DeepSpeed ZeRO stage"
        )
    whole = folder / whole_name
    if partitioned:
        if not ranks and whole.is_file():
            raise ValueError(
                f"{whole} holds a whole EMA written without DeepSpeed ZeRO-3, but this run partitions the model with "
                "ZeRO-3, whose EMA resumes from per-rank partition states: resume with the same DeepSpeed ZeRO stage"
            )
        return folder / partition_state_name(get_rank()) if ranks else None
    return whole if whole.is_file() else None
