"""The EMA's snapshot series for post-hoc reconstruction: when to write, writing, and continuing on resume.

:class:`SnapshotSeries` numbers the snapshots written to ``snapshot_folder`` (every ``snapshot_interval``,
as :func:`emakit.averaging.clock.update_due` decides; the file format is :mod:`emakit.posthoc.snapshots`).
Each series carries a run id, kept in the EMA's state and in every snapshot, so that a new run never
writes into (and mixes with) another run's folder. On resume it moves the snapshots written after the
resumed point aside (their updates will be redone), so that the series has neither a gap nor a duplicate.

With ``raw`` (``EMA(..., snapshot_raw=True)``) each snapshot also holds the training weights after its update, and
the first one the weights at the start (``theta_0``): a copy of them is kept from the start until that first
snapshot is written (one model's tensors, on their device), then dropped. Until then the copy is part of the
averager's state, so a run resumed before its first snapshot writes the same ``theta_0``.
"""

from __future__ import annotations

import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from emakit.parallel.ranks import all_reduce_sum, barrier, get_rank
from emakit.posthoc.profiles import HalfLifeProfile, Profile
from emakit.posthoc.snapshots import (
    DtypeOverflowError,
    discard_snapshots_after,
    next_snapshot_index,
    snapshot_runs,
    write_snapshot,
)
from emakit.posthoc.snapshots.reading import describe_indices, describe_run
from emakit.time import Time, TimeUnit

__all__ = ["SnapshotSeries", "check_snapshot_folder_writable"]


def check_snapshot_folder_writable(folder: Path) -> None:
    """Fail at attach, not hours later at the first snapshot, if ``folder`` cannot hold snapshots."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe.", suffix=".tmp"):
            pass
    except OSError as e:
        raise ValueError(
            f"snapshot_folder {str(folder)!r} is not a writable folder: {e.strerror or e}; give a folder "
            "that can be created and written"
        ) from e


class SnapshotSeries:
    """The index of the next snapshot in the series, its run id, and writing or resuming it in a folder."""

    def __init__(self, raw: bool = False) -> None:
        self.index = 0
        #: Whether snapshots hold the raw training weights (and the first one ``theta_0``).
        self.raw = raw
        #: theta_0 (``raw`` only) from the start until the first snapshot holds it; in the averager's state meanwhile.
        self.start: dict[str, torch.Tensor] | None = None
        #: Identifies this run's snapshots (None: a resumed legacy run whose snapshots carry no id).
        self.run: str | None = uuid.uuid4().hex
        #: Whether the folder was checked for another run's snapshots (before the first write).
        self.folder_checked = False
        self._overflow_warned = False

    def check_folder(self, folder: Path, run: str | None, device: torch.device) -> None:
        """Refuse ``folder`` if it holds snapshots of a run other than ``run`` (checked on rank 0, raised on all).

        Called before anything is written there: at the first start or update of a fresh EMA, and when an
        EMA state is loaded (``run`` is then the state's).
        """
        message = None
        if get_rank() == 0:
            others = {r: indices for r, indices in snapshot_runs(folder).items() if r != run}
            if others:
                count = sum(len(indices) for indices in others.values())
                whose = ", ".join(f"{describe_indices(indices)} of {describe_run(r)}" for r, indices in others.items())
                message = (
                    f"snapshot_folder {str(folder)!r} already holds {count} snapshot(s) of another run ({whose}); "
                    f"this EMA is {describe_run(run)}: writing there would overwrite them and reconstructions would "
                    "mix the two runs. Give this run its own snapshot_folder or move those snapshots elsewhere; to "
                    "continue that run, load its EMA state (ema.load_state_dict) before training"
                )
        if all_reduce_sum([1.0 if message else 0.0], device)[0]:
            raise ValueError(message or f"snapshot_folder {str(folder)!r} was refused on rank 0 (see its error)")
        self.folder_checked = True

    def check_once(self, folder: Path, device: Callable[[], torch.device]) -> None:
        """:meth:`check_folder` for this series' run, unless done (``device`` gives the collective's device)."""
        if not self.folder_checked:
            self.check_folder(folder, self.run, device())

    def started(self, weights: Mapping[str, torch.Tensor]) -> None:
        """The averages (re)started from ``weights``: with ``raw``, keep a copy as ``theta_0`` for the first snapshot."""
        if self.raw and self.index == 0:
            self.start = {name: tensor.detach().clone() for name, tensor in weights.items()}

    def restore(self, index: int, run: str | None, start: dict[str, torch.Tensor] | None) -> None:
        """Continue a saved series: its next index, run id and the theta_0 it kept (None once written)."""
        self.index, self.run = index, run
        self.start = {name: tensor.clone() for name, tensor in start.items()} if self.raw and start else None

    def write(
        self,
        folder: Path,
        averages: Sequence[Mapping[str, torch.Tensor]],
        profiles: Sequence[Profile],
        *,
        t: int,
        step: int,
        update_interval: Time,
        dtype: torch.dtype,
        raw: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write ``averages`` to ``folder`` as the next snapshot: after update ``t`` (1-based, counting the start);
        with :attr:`raw`, also ``raw()`` (the training weights now) and, in the first, the kept ``theta_0``.

        A weight beyond a 16-bit ``dtype``'s range does not end the run: that snapshot is written in float32
        (readers accept a series of mixed dtypes), with a warning the first time.
        """
        interval = int(update_interval.value)
        args = dict(
            folder=folder,
            index=self.index,
            averages=list(averages),
            # a constant smoothing of 0 or 1 has no profile: record a vanishing one for each average
            profiles=list(profiles) if len(profiles) == len(averages) else [HalfLifeProfile(1e-9)] * len(averages),
            t=t,
            step=step,
            update_interval=interval if update_interval.unit == TimeUnit.BATCH else 1,
            run=self.run,
        )
        if self.raw and raw is not None:
            args["raw"] = raw()
            if self.index == 0 and self.start is not None:
                args["start"] = self.start
        try:
            path = write_snapshot(dtype=dtype, **args)  # type: ignore[arg-type]
        except FileExistsError as e:
            raise ValueError(self._shared_folder(folder)) from e
        except DtypeOverflowError as e:
            if dtype == torch.float32:
                raise
            if not self._overflow_warned:
                warnings.warn(
                    f"snapshot {self.index} in {str(folder)!r} is written in float32, not snapshot_dtype={dtype}: {e}. "
                    "Later snapshots that overflow are written in float32 too, without this warning",
                    stacklevel=4,
                )
                self._overflow_warned = True
            path = write_snapshot(dtype=torch.float32, **args)  # type: ignore[arg-type]
        self.index += 1
        self.start = None
        return path

    def _shared_folder(self, folder: Path) -> str:
        """The error for a snapshot index that another writer took in ``folder`` after it was checked."""
        theirs = next((r for r, indices in snapshot_runs(folder).items() if self.index in indices), None)
        return (
            f"snapshot_folder {str(folder)!r} received snapshot {self.index} from {describe_run(theirs)} while this "
            f"EMA ({describe_run(self.run)}) wrote there: two EMAs or runs share the folder, and their snapshots "
            "would overwrite each other. Give each EMA its own snapshot_folder"
        )

    def resume(self, folder: Path, t: int, stacklevel: int) -> None:
        """Continue the series in ``folder`` after resuming at update ``t`` (0 before the start): move the
        snapshots after it aside, with a warning, and continue at the folder's count (with a warning if
        :attr:`index` says otherwise). ``stacklevel`` is as :func:`warnings.warn` counts it from this method."""
        if get_rank() == 0:
            moved = discard_snapshots_after(folder, t)
            if moved:
                warnings.warn(
                    f"resuming at EMA update {t}: the {len(moved)} snapshot(s) of snapshot_folder {str(folder)!r} "
                    f"taken after it belong to the run's lost future; they were moved aside into "
                    f"{str(moved[0].parent)!r} (not deleted), and are written again as training goes on",
                    stacklevel=stacklevel,
                )
        barrier()
        self.folder_checked = True
        found = next_snapshot_index(folder)
        if found != self.index:
            warnings.warn(
                f"snapshot_folder {str(folder)!r} holds {found} snapshot(s) up to the resumed point, "
                f"the EMA state says {self.index}: continuing at {found}",
                stacklevel=stacklevel,
            )
            self.index = found
