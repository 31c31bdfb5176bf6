"""The EMA's snapshot series for post-hoc reconstruction: when to write, writing, and continuing on resume.

:class:`SnapshotSeries` numbers the snapshots written to ``snapshot_folder`` (every ``snapshot_interval``,
as :func:`emakit.averaging.clock.update_due` decides; the file format is :mod:`emakit.posthoc.snapshots`).
On resume it drops the snapshots written after the resumed point, whose updates will be redone, so that
the series has neither a gap nor a duplicate.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from emakit.parallel.ranks import barrier, get_rank
from emakit.posthoc.profiles import HalfLifeProfile, Profile
from emakit.posthoc.snapshots import discard_snapshots_after, next_snapshot_index, write_snapshot
from emakit.time import Time, TimeUnit

__all__ = ["SnapshotSeries"]


class SnapshotSeries:
    """The index of the next snapshot in the series, and writing or resuming it in a folder."""

    def __init__(self) -> None:
        self.index = 0

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
    ) -> Path:
        """Write ``averages`` to ``folder`` as the next snapshot: after update ``t`` (1-based, counting the start)."""
        interval = int(update_interval.value)
        path = write_snapshot(
            folder,
            self.index,
            list(averages),
            # a constant smoothing of 0 or 1 has no profile: record a vanishing one for each average
            list(profiles) if len(profiles) == len(averages) else [HalfLifeProfile(1e-9)] * len(averages),
            t=t,
            step=step,
            update_interval=interval if update_interval.unit == TimeUnit.BATCH else 1,
            dtype=dtype,
        )
        self.index += 1
        return path

    def resume(self, folder: Path, t: int, stacklevel: int) -> None:
        """Continue the series in ``folder`` after resuming at update ``t`` (0 before the start): drop the
        snapshots after it and continue at the folder's count (with a warning if :attr:`index` says
        otherwise, ``stacklevel`` as :func:`warnings.warn` counts it from this method)."""
        if get_rank() == 0:
            discard_snapshots_after(folder, t)
        barrier()
        found = next_snapshot_index(folder)
        if found != self.index:
            warnings.warn(
                f"snapshot_folder {str(folder)!r} holds {found} snapshot(s) up to the resumed point, "
                f"the EMA state says {self.index}: continuing at {found}",
                stacklevel=stacklevel,
            )
            self.index = found
