"""Snapshot folders: the averages of a run saved at intervals, for post-hoc reconstruction.

A folder holds one entry per snapshot, numbered from 0 without gaps by the writer:

- ``snapshot-{index:06d}.safetensors``: every average of one snapshot in one safetensors file, the tensor
  ``name`` of average ``j`` stored as ``"{j}/{name}"`` (canonical names). The metadata below is the JSON string
  under the key ``"emakit.posthoc"`` of the file's header metadata, so tensors and metadata appear together.
- ``snapshot-{index:06d}/``: the same for sharded (FSDP2/DTensor) averages: a torch.distributed.checkpoint
  directory written by every rank (each writes its own shards; nothing is gathered) with the metadata in
  ``snapshot.json`` beside DCP's files.

Metadata (JSON): ``format``, ``format_version``, ``emakit_version``, ``index``, ``t`` (EMA updates so far: the
time axis of every profile), ``step`` (optimizer steps so far), ``update_interval`` (steps per EMA update),
``dtype`` (of the floating tensors), ``sharded``, ``world_size``, ``run`` (an id of the run that wrote it, so
that a folder mixing two runs is refused; absent in snapshots from before it was recorded) and ``averages``: one profile per average,
``{"kind": "power", "sigma_rel": s, "gamma": g}`` or ``{"kind": "half_life", "half_life_updates": h}``; sharded
snapshots add ``names``, the tensors' order (a safetensors file keeps it in its data offsets).

Optionally (``EMA(..., snapshot_raw=True)``; format version 2, metadata ``raw`` / ``start`` true) a snapshot also
holds the raw training weights after update ``t`` as ``"raw/{name}"``, and the first snapshot of the series the
weights at the start of the averages, ``theta_0``, as ``"start/{name}"``: one model each, in the snapshot dtype.
Version 1 (averages only) is what a snapshot without them is still written as, and what older folders hold.

Writes are atomic (:mod:`emakit.atomic`): a hidden temporary is written, synced to disk and renamed into place,
then the folder is synced; readers ignore temporaries, so a crash never leaves a partial snapshot. An existing
snapshot is replaced only with ``overwrite=True``. Floating tensors are stored in float32 (default), float16 or bfloat16;
integer and bool tensors as they are.

Modules: :mod:`~emakit.posthoc.snapshots.format` (names and codes), :mod:`~emakit.posthoc.snapshots.atomic`
(the safetensors writer), :mod:`~emakit.posthoc.snapshots.writing`, :mod:`~emakit.posthoc.snapshots.reading` and
:mod:`~emakit.posthoc.snapshots.series` (the next index, the runs in a folder, moving a lost future aside into
a hidden ``.discarded-<time>/`` sub-folder). Every public name is
importable from here.
"""

from __future__ import annotations

from emakit.posthoc.snapshots.atomic import DtypeOverflowError, write_safetensors
from emakit.posthoc.snapshots.format import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    RAW,
    READABLE_VERSIONS,
    SHARDED_METADATA_FILE,
    SNAPSHOT_DTYPES,
    START,
    snapshot_name,
)
from emakit.posthoc.snapshots.reading import (
    SnapshotInfo,
    SnapshotReader,
    missing_snapshot_indices,
    read_snapshot_index,
)
from emakit.posthoc.snapshots.series import (
    DISCARDED_PREFIX,
    discard_snapshots_after,
    next_snapshot_index,
    snapshot_runs,
)
from emakit.posthoc.snapshots.writing import write_snapshot

__all__ = [
    "DISCARDED_PREFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "RAW",
    "READABLE_VERSIONS",
    "SHARDED_METADATA_FILE",
    "SNAPSHOT_DTYPES",
    "START",
    "DtypeOverflowError",
    "SnapshotInfo",
    "SnapshotReader",
    "discard_snapshots_after",
    "missing_snapshot_indices",
    "next_snapshot_index",
    "read_snapshot_index",
    "snapshot_name",
    "snapshot_runs",
    "write_safetensors",
    "write_snapshot",
]
