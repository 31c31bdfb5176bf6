"""CheckpointSaver: periodic, atomic checkpoints that carry the published (EMA) weights as the model."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emakit.atomic import replace_symlink
from emakit.checkpoint import checkpoint_name, remove_stale_temporaries, save_checkpoint, saved_entries
from emakit.core.callback import Callback
from emakit.parallel.ranks import meet
from emakit.parallel.sharding import is_sharded_model
from emakit.time import Time, TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["CheckpointSaver"]

LATEST = "latest.pt"
LATEST_SHARDED = "latest"

#: How long the ranks wait for each other at fit start, where rank 0 checks the folder.
FOLDER_CHECK_TIMEOUT_S = 600.0


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
        overwrite: a fresh run (not resumed) whose ``folder`` holds checkpoints of another run refuses to
            start unless this is True; then those checkpoints (and ``latest``) are deleted at the start, with
            a warning. A resumed run continues in its folder either way.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        save_interval: str | Time = "1ep",
        num_checkpoints_to_keep: int = -1,
        overwrite: bool = False,
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
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
        self.num_checkpoints_to_keep = num_checkpoints_to_keep
        self.overwrite = overwrite
        self.saved: list[str] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        refused = None
        if state.rank == 0:
            self.check_writable()
            try:
                self._claim_folder(resumed=state.timestamp.batch > 0 or bool(self.saved))
            except FileExistsError as e:
                refused = e
        meet("CheckpointSaver.fit_start", FOLDER_CHECK_TIMEOUT_S, error=refused)

    def _claim_folder(self, resumed: bool) -> None:
        """Make ``folder`` this run's: refuse another run's checkpoints in it (or, with ``overwrite``, delete
        them), then delete the temporaries of interrupted checkpoint writes (emakit's own only)."""
        others = [] if resumed else saved_entries(self.folder)
        if others and not self.overwrite:
            names = [p.name for p in others if not p.name.startswith("latest")]
            shown = ", ".join(names[:3]) + (f", ..., {names[-1]}" if len(names) > 3 else "")
            raise FileExistsError(
                f"save_folder {str(self.folder)!r} holds checkpoints of another run ({shown}): a fresh run would "
                "write over them and re-point latest. Give this run its own save_folder, pass save_overwrite=True "
                "(CheckpointSaver(overwrite=True)) to delete them, or autoresume=True (or load_path='latest') "
                "to continue that run"
            )
        for path in others:
            _remove(path)
        if others:
            warnings.warn(
                f"save_overwrite=True: removed {sum(not p.name.startswith('latest') for p in others)} checkpoint(s) "
                f"of an earlier run from save_folder {str(self.folder)!r}",
                stacklevel=2,
            )
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
        # the folder is this run's (fit_start): a name written again is a step redone after a resume
        path = save_checkpoint(
            state, self.folder / name, publish=True, callback_states={self.name: {"saved": saved}}, overwrite=True
        )
        self.saved = saved
        if state.rank == 0:
            self._point_latest(name, LATEST_SHARDED if is_sharded_model(state.model) else LATEST)
            for old in superseded:
                _remove(self.folder / old)
        self._rotate(delete=state.rank == 0)
        return path if state.rank == 0 else None

    def _point_latest(self, name: str, latest: str = LATEST) -> None:
        replace_symlink(self.folder / latest, name)

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
