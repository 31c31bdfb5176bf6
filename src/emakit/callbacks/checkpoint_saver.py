"""CheckpointSaver: periodic, atomic checkpoints that carry the published (EMA) weights as the model."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emakit.checkpoint import checkpoint_name, remove_stale_temporaries, save_checkpoint
from emakit.core.callback import Callback
from emakit.parallel.sharding import is_sharded_model
from emakit.time import Time, TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["CheckpointSaver"]

LATEST = "latest.pt"
LATEST_SHARDED = "latest"


class CheckpointSaver(Callback):
    """Write ``ep{E}-ba{B}.pt`` into ``folder`` every ``save_interval`` and at the end of training.

    Each step is saved once: a batch checkpoint at an epoch's last batch is written before the epoch's end
    (``ep{E-1}-ba{B}``); if training ends there, the final checkpoint ``ep{E}-ba{B}``, written after the
    epoch's end, replaces it.

    Each file's ``state.model`` holds the weights algorithms publish (the EMA weights once the EMA has
    started) under canonical names; the training weights, optimizer, scheduler, algorithm, RNG and
    timestamp state sit beside them, so a run resumed from it continues exactly. ``latest.pt`` is a
    symbolic link to the newest file. Only rank 0 writes.

    A sharded (FSDP) run writes DCP directories ``ep{E}-ba{B}/`` instead, every rank its own shards, with
    ``latest`` linking to the newest; see :mod:`emakit.distributed`.

    Args:
        folder: where checkpoints go (created if missing).
        save_interval: ``'Nep'`` or ``'Nba'``, N > 0.
        num_checkpoints_to_keep: how many of the newest files to keep; -1 keeps all.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        save_interval: str | Time = "1ep",
        num_checkpoints_to_keep: int = -1,
    ) -> None:
        if not isinstance(folder, (str, os.PathLike)) or str(folder) == "":
            raise TypeError(f"folder must be a non-empty path, got {folder!r}")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"folder {str(self.folder)!r} exists and is not a directory")
        self.save_interval = Time.coerce(
            save_interval, "save_interval", (TimeUnit.BATCH, TimeUnit.EPOCH), positive=True
        )
        if self.save_interval.value <= 0:
            raise ValueError(f"save_interval must be greater than 0, got {str(self.save_interval)!r}")
        if (
            isinstance(num_checkpoints_to_keep, bool)
            or not isinstance(num_checkpoints_to_keep, int)
            or (num_checkpoints_to_keep < 1 and num_checkpoints_to_keep != -1)
        ):
            raise ValueError(
                f"num_checkpoints_to_keep must be -1 (keep all) or a positive int, got {num_checkpoints_to_keep!r}"
            )
        self.num_checkpoints_to_keep = num_checkpoints_to_keep
        self.saved: list[str] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.rank == 0:
            self.check_writable()
            remove_stale_temporaries(self.folder)

    def check_writable(self) -> None:
        """Fail before training, not at the first save, if ``folder`` cannot hold checkpoints."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".write-probe.", suffix=".tmp"):
                pass
        except OSError as e:
            raise ValueError(f"save_folder {str(self.folder)!r} is not a writable folder: {e.strerror or e}") from e

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.save_interval.unit == TimeUnit.BATCH and state.timestamp.batch % int(self.save_interval.value) == 0:
            self.save(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.save_interval.unit == TimeUnit.EPOCH and state.timestamp.epoch % int(self.save_interval.value) == 0:
            self.save(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if checkpoint_name(state) not in self.saved:
            self.save(state)

    def save(self, state: State) -> Path | None:
        """Write a checkpoint of ``state`` now; returns its path (None on ranks other than 0).

        Every rank must call this (a sharded model's ranks each write their shards; otherwise rank 0 writes).
        Every rank keeps the same ``saved`` list.
        """
        name = checkpoint_name(state)
        # The same step saved before its epoch's end (a batch checkpoint at the epoch's last batch): this one
        # replaces it, so that every step is saved once.
        superseded = [old for old in self.saved if old != name and _step_of(old) == state.timestamp.batch]
        saved = [old for old in self.saved if old != name and old not in superseded] + [name]
        path = save_checkpoint(state, self.folder / name, publish=True, callback_states={self.name: {"saved": saved}})
        self.saved = saved
        if state.rank == 0:
            self._point_latest(name, LATEST_SHARDED if is_sharded_model(state.model) else LATEST)
            for old in superseded:
                _remove(self.folder / old)
        self._rotate(delete=state.rank == 0)
        return path if state.rank == 0 else None

    def _point_latest(self, name: str, latest: str = LATEST) -> None:
        link = self.folder / latest
        tmp = self.folder / f".{latest}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, link)

    def _rotate(self, delete: bool = True) -> None:
        if self.num_checkpoints_to_keep == -1:
            return
        while len(self.saved) > self.num_checkpoints_to_keep:
            old = self.folder / self.saved.pop(0)
            if delete:
                _remove(old)

    def state_dict(self) -> dict[str, Any]:
        return {"saved": list(self.saved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = [str(s) for s in state.get("saved", [])]


_STEP = re.compile(r"-ba(\d+)(?:\.pt)?$")


def _step_of(name: str) -> int | None:
    """The batch count in a checkpoint name ``ep{E}-ba{B}[.pt]``; None for other names."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


def _remove(path: Path) -> None:
    """Delete a checkpoint this saver wrote: a file, or a sharded run's DCP directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
