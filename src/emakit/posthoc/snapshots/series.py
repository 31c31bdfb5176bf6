"""A snapshot folder as a series over a run: the index the next snapshot gets, and discarding the snapshots of a
future that a resumed run recomputes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from emakit.posthoc.snapshots.atomic import _fsync_dir
from emakit.posthoc.snapshots.format import _check_int, _entries
from emakit.posthoc.snapshots.reading import _read_one

__all__ = [
    "discard_snapshots_after",
    "next_snapshot_index",
]


def next_snapshot_index(folder: str | os.PathLike[str]) -> int:
    """The index the next snapshot of the series in ``folder`` gets: one past the highest (0 for none/no folder).

    Only names are read; temporaries of interrupted writes do not count, so a resumed run continues the
    series without a gap or a duplicate. Call :func:`discard_snapshots_after` first when resuming from an
    earlier point than the last snapshot.
    """
    path = Path(folder)
    if not path.is_dir():
        return 0
    entries = _entries(path)
    return max(entries) + 1 if entries else 0


def discard_snapshots_after(folder: str | os.PathLike[str], t: int) -> list[Path]:
    """Remove the snapshots of ``folder`` taken after ``t`` EMA updates; return their paths.

    A run resumed from a checkpoint taken at ``t`` updates redoes the updates after it: the snapshots written
    after that checkpoint belong to a future that is being recomputed. Call on one process only.
    """
    t = _check_int(t, "t", 0)
    path = Path(folder)
    if not path.is_dir():
        return []
    removed = []
    for index, found in sorted(_entries(path).items()):
        for entry in found:
            info = _read_one(entry, index)
            if info.t > t:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
    if removed:
        _fsync_dir(path)
    return removed
