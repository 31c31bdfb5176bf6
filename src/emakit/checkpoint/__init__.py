"""Checkpoints: one save and one load entry point for both formats.

:func:`save_checkpoint` and :func:`load_checkpoint` decide the format themselves: a sharded (FSDP2) model
is written as a torch.distributed.checkpoint directory, every rank its own shards
(:mod:`~emakit.checkpoint.sharded`); anything else as one file written atomically by rank 0
(:mod:`~emakit.checkpoint.files`). What a checkpoint holds is :mod:`~emakit.checkpoint.contents`;
:func:`export_ema_weights` writes the EMA weights alone for inference;
:func:`average_checkpoints` the mean of several checkpoints' weights (:mod:`~emakit.checkpoint.average`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emakit.checkpoint.average import AveragedCheckpoint, average_checkpoints
from emakit.checkpoint.contents import apply_checkpoint, build_checkpoint, model_state_dict, unique_names
from emakit.checkpoint.export import export_ema_weights, model_weights
from emakit.checkpoint.files import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_checkpoint_format,
    list_checkpoints,
    load_checkpoint_file,
    newest_loadable_checkpoint,
    read_checkpoint_file,
    remove_stale_temporaries,
    save_checkpoint_file,
    saved_entries,
    unreadable_checkpoint,
)
from emakit.checkpoint.sharded import (
    build_sharded_checkpoint,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    newest_sharded_checkpoint,
    read_sharded_checkpoint,
    save_sharded_checkpoint,
)
from emakit.core.state import State
from emakit.parallel.ranks import barrier
from emakit.parallel.sharding import is_sharded_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "AveragedCheckpoint",
    "apply_checkpoint",
    "average_checkpoints",
    "build_checkpoint",
    "build_sharded_checkpoint",
    "check_checkpoint_format",
    "checkpoint_name",
    "export_ema_weights",
    "is_sharded_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_checkpoint_file",
    "load_sharded_checkpoint",
    "model_state_dict",
    "model_weights",
    "newest_loadable_checkpoint",
    "newest_sharded_checkpoint",
    "read_checkpoint_file",
    "read_sharded_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
    "save_checkpoint_file",
    "save_sharded_checkpoint",
    "saved_entries",
    "unique_names",
    "unreadable_checkpoint",
]


def checkpoint_name(state: State) -> str:
    """``ep{E}-ba{B}.pt``, or ``ep{E}-ba{B}`` for the DCP directory of a sharded model."""
    suffix = "" if is_sharded_model(state.model) else ".pt"
    return f"ep{state.timestamp.epoch}-ba{state.timestamp.batch}{suffix}"


def save_checkpoint(
    state: State,
    path: str | os.PathLike[str],
    *,
    publish: bool,
    callback_states: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state``'s checkpoint to ``path``; every rank calls this, and every rank gets ``path`` back.

    A sharded model writes the DCP directory ``path`` from all ranks; otherwise rank 0 writes one file.
    ``publish`` puts the algorithms' published weights (the EMA's) in ``state.model`` (see
    :mod:`~emakit.checkpoint.contents`); ``callback_states`` replaces callbacks' entries by name. An existing
    ``path`` is replaced only with ``overwrite``.
    """
    if is_sharded_model(state.model):
        checkpoint = build_sharded_checkpoint(state, publish=publish)
        checkpoint["state"]["callbacks"].update(callback_states or {})
        return save_sharded_checkpoint(checkpoint, path, overwrite=overwrite)
    if state.rank == 0:
        checkpoint = build_checkpoint(state, publish=publish)
        checkpoint["state"]["callbacks"].update(callback_states or {})
        save_checkpoint_file(checkpoint, path, overwrite=overwrite)
    barrier()
    return Path(path)


def load_checkpoint(
    state: State, path: str | os.PathLike[str], *, newest: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """Resume ``state`` from the checkpoint at ``path`` and return ``(path, checkpoint)``.

    ``path`` is a checkpoint file or DCP directory. With ``newest=True`` it is a folder, and the newest
    readable checkpoint in it is loaded (DCP directories for a sharded model, files otherwise; newer
    unreadable files are skipped with a warning); None if it holds none. Everything is checked before
    the run is changed (see :func:`~emakit.checkpoint.contents.apply_checkpoint`).
    """
    if newest:
        if is_sharded_model(state.model):
            found_dir = newest_sharded_checkpoint(path)
            if found_dir is None:
                return None
            path = found_dir
        else:
            found = newest_loadable_checkpoint(path)
            if found is None:
                return None
            path, checkpoint = found
            apply_checkpoint(state, checkpoint, source=f"checkpoint {str(path)!r}")
            return Path(path), checkpoint
    source = f"checkpoint {str(path)!r}"
    if is_sharded_checkpoint(path):
        checkpoint, load_optimizers = load_sharded_checkpoint(state, path)
        apply_checkpoint(state, checkpoint, source=source, load_optimizers=load_optimizers)
    else:
        checkpoint = load_checkpoint_file(path)
        apply_checkpoint(state, checkpoint, source=source)
    return Path(path), checkpoint
