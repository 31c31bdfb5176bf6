"""A snapshot folder as a series over a run: the index the next snapshot gets, which runs wrote the folder, and
moving aside the snapshots of a future that a resumed run recomputes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from emakit.atomic import fsync_dir
from emakit.posthoc.snapshots.format import _check_int, _entries
from emakit.posthoc.snapshots.reading import _read_one

__all__ = [
    "DISCARDED_PREFIX",
    "discard_snapshots_after",
    "next_snapshot_index",
    "snapshot_runs",
]

#: Prefix of the hidden sub-folders that discarded snapshots are moved into (readers ignore them).
DISCARDED_PREFIX = ".discarded-"


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


def snapshot_runs(folder: str | os.PathLike[str]) -> dict[str | None, list[int]]:
    """The snapshot indices in ``folder`` by the run that wrote them (None: snapshots without a run id)."""
    path = Path(folder)
    runs: dict[str | None, list[int]] = {}
    if not path.is_dir():
        return runs
    for index, found in sorted(_entries(path).items()):
        for entry in found:
            runs.setdefault(_read_one(entry, index).run, []).append(index)
    return runs


def discard_snapshots_after(folder: str | os.PathLike[str], t: int) -> list[Path]:
    """Move the snapshots of ``folder`` taken after ``t`` EMA updates aside; return where they went.

    A run resumed from a checkpoint taken at ``t`` updates redoes the updates after it: the snapshots written
    after that checkpoint belong to a future that is being recomputed. They are not deleted (they may be a
    branch someone still wants) but moved into a hidden sub-folder ``.discarded-<UTC time>/`` of ``folder``,
    which readers ignore. Call on one process only.
    """
    t = _check_int(t, "t", 0)
    path = Path(folder)
    if not path.is_dir():
        return []
    lost = []
    for index, found in sorted(_entries(path).items()):
        lost += [entry for entry in found if _read_one(entry, index).t > t]
    if not lost:
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path / f"{DISCARDED_PREFIX}{stamp}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = path / f"{DISCARDED_PREFIX}{stamp}-{suffix}"
    aside.mkdir()
    moved = []
    for entry in lost:
        os.replace(entry, aside / entry.name)
        moved.append(aside / entry.name)
    fsync_dir(aside)
    fsync_dir(path)
    return moved
