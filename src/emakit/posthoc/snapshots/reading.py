"""Reading snapshots: every snapshot's metadata and tensor layout, checked to form one series, and the tensors of
one snapshot a few at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emakit.posthoc.profiles import Profile, profile_from_dict
from emakit.posthoc.snapshots.format import (
    _DCP_METADATA,
    _SAFETENSORS_DTYPES,
    FORMAT,
    METADATA_KEY,
    RAW,
    READABLE_VERSIONS,
    SHARDED_METADATA_FILE,
    START,
    _entries,
)

__all__ = [
    "SnapshotInfo",
    "SnapshotReader",
    "missing_snapshot_indices",
    "read_snapshot_index",
]


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as :func:`read_snapshot_index` found it: its metadata and tensor layout (no tensor data)."""

    path: Path
    index: int
    t: int
    step: int
    update_interval: int
    dtype: str
    sharded: bool
    profiles: tuple[Profile, ...]
    #: canonical name -> (shape, dtype) of each average's tensor
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    metadata: Mapping[str, Any]
    #: The id of the run that wrote it (None: written before emakit recorded runs, one legacy run).
    run: str | None = None
    #: Whether it holds the raw training weights after update ``t`` (``"raw/{name}"``).
    raw: bool = False
    #: Whether it holds the training weights at the start of the averages, ``theta_0`` (``"start/{name}"``).
    start: bool = False


def _check_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"snapshot folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"snapshot folder {str(path)!r} is not a directory")
    return path


def _safe_open() -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            "reading post-hoc snapshots needs the safetensors package: pip install safetensors (or emakit's demo extra)"
        ) from None
    return safe_open


def _safetensors_layout(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    safe_open = _safe_open()
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            layout = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                part = f.get_slice(key)
                layout[key] = (tuple(part.get_shape()), _torch_dtype(part.get_dtype(), path))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ValueError(f"snapshot {str(path)!r} is not a readable safetensors file: {e}") from e
    layout = {key: layout[key] for key in _written_order(path, layout)}
    if METADATA_KEY not in header:
        raise ValueError(f"snapshot {str(path)!r} has no {METADATA_KEY!r} metadata: it was not written by emakit")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"snapshot {str(path)!r}: its {METADATA_KEY!r} metadata is not JSON ({e})") from e
    return metadata, layout


def _written_order(path: Path, keys: Mapping[str, object]) -> list[str]:
    """``keys`` in the order their data lies in the file (the writer's order; safetensors lists them sorted)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return sorted(keys, key=lambda k: (header[k]["data_offsets"][0], header[k]["data_offsets"][1], k))


def _torch_dtype(code: str, path: Path) -> torch.dtype:
    for dtype, name in _SAFETENSORS_DTYPES.items():
        if name == code:
            return dtype
    raise ValueError(f"snapshot {str(path)!r} holds a tensor of dtype {code!r}, which emakit does not write")


def _sharded_layout(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    info = path / SHARDED_METADATA_FILE
    if not info.is_file() or not (path / _DCP_METADATA).is_file():
        raise ValueError(
            f"snapshot {str(path)!r} is not a complete sharded snapshot (no {info.name} or {_DCP_METADATA})"
        )
    try:
        metadata = json.loads(info.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"snapshot {str(info)!r} is not JSON ({e})") from e
    layout = {}
    for key, item in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            layout[key] = (tuple(item.size), item.properties.dtype)
    order = {name: i for i, name in enumerate(metadata.get("names", []) if isinstance(metadata, dict) else [])}
    position = {key: order.get(key.partition("/")[2], len(order)) for key in layout}
    return metadata, {key: layout[key] for key in sorted(layout, key=lambda k: (position[k], k))}


def _read_one(path: Path, index: int) -> SnapshotInfo:
    metadata, layout = _sharded_layout(path) if path.is_dir() else _safetensors_layout(path)
    where = f"snapshot {str(path)!r}"
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{where} is not an emakit post-hoc snapshot (metadata format is not {FORMAT!r})")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{where} has format_version {metadata.get('format_version')!r}; this emakit reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("index", "t", "step", "update_interval"):
        if not isinstance(metadata.get(key), int) or isinstance(metadata.get(key), bool):
            raise ValueError(f"{where}: metadata {key!r} must be an integer, got {metadata.get(key)!r}")
    if metadata.get("run") is not None and not isinstance(metadata["run"], str):
        raise ValueError(f"{where}: metadata 'run' must be a string, got {metadata['run']!r}")
    if metadata["index"] != index:
        raise ValueError(f"{where}: its metadata says index {metadata['index']}, its name says {index}")
    raw_profiles = metadata.get("averages")
    if not isinstance(raw_profiles, list) or not raw_profiles:
        raise ValueError(f"{where}: metadata 'averages' must be a non-empty list of profiles")
    profiles = tuple(profile_from_dict(p, f"{where}, averages[{j}]") for j, p in enumerate(raw_profiles))
    per_average: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{} for _ in profiles]
    weights: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for key, value in layout.items():
        head, _, name = key.partition("/")
        if head in (RAW, START) and name and metadata.get("format_version", 1) >= 2:
            weights.setdefault(head, {})[name] = value
            continue
        if not head.isdigit() or int(head) >= len(profiles) or not name:
            raise ValueError(f"{where} holds a tensor {key!r} that belongs to no average (0..{len(profiles) - 1})")
        per_average[int(head)][name] = value
    for j, tensors in [*enumerate(per_average[1:], start=1), *weights.items()]:
        if tensors.keys() != per_average[0].keys():
            name = sorted(tensors.keys() ^ per_average[0].keys())[0]
            raise ValueError(f"{where}: averages 0 and {j} hold different tensors (e.g. {name!r})")
    return SnapshotInfo(
        path=path,
        index=index,
        t=metadata["t"],
        step=metadata["step"],
        update_interval=metadata["update_interval"],
        dtype=str(metadata.get("dtype")),
        sharded=path.is_dir(),
        profiles=profiles,
        tensors=per_average[0],
        metadata=metadata,
        run=metadata.get("run"),
        raw=RAW in weights,
        start=START in weights,
    )


def read_snapshot_index(folder: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot in ``folder``, in index order, after checking they belong to one series.

    Reads metadata and tensor layouts only. Hidden temporaries of interrupted writes are ignored.

    Raises:
        FileNotFoundError / NotADirectoryError: ``folder`` is missing or not a directory.
        ValueError: ``folder`` holds no snapshot; an index appears twice (as a file and a directory); a
            snapshot is unreadable or not emakit's; snapshots of two runs are mixed; or snapshots disagree on the averages' profiles,
            ``update_interval``, tensor names or shapes, or do not advance in ``t``. Each error names the file.
    """
    path = _check_folder(folder)
    entries = _entries(path)
    if not entries:
        raise ValueError(
            f"snapshot folder {str(path)!r} holds no snapshots "
            "(snapshot-NNNNNN.safetensors files or snapshot-NNNNNN/ directories)"
        )
    infos: list[SnapshotInfo] = []
    for index in sorted(entries):
        found = entries[index]
        if len(found) > 1:
            raise ValueError(f"snapshot {index} appears twice in {str(path)!r}: {', '.join(p.name for p in found)}")
        infos.append(_read_one(found[0], index))
    check_one_run(path, infos)
    first = infos[0]
    for info in infos[1:]:
        where = f"snapshot {str(info.path)!r}"
        if info.profiles != first.profiles:
            raise ValueError(
                f"{where} tracks averages {[str(p) for p in info.profiles]}, but {first.path.name} tracks "
                f"{[str(p) for p in first.profiles]}: a folder must hold one run's snapshots"
            )
        if info.update_interval != first.update_interval:
            raise ValueError(
                f"{where} has update_interval {info.update_interval}, {first.path.name} has {first.update_interval}"
            )
        if info.tensors.keys() != first.tensors.keys():
            name = sorted(info.tensors.keys() ^ first.tensors.keys())[0]
            side = "has" if name in info.tensors else "lacks"
            raise ValueError(
                f"{where} {side} tensor {name!r} unlike {first.path.name}: a folder must hold one model's snapshots"
            )
        for name, (shape, _) in info.tensors.items():
            if shape != first.tensors[name][0]:
                raise ValueError(
                    f"{where}: tensor {name!r} has shape {shape}, in {first.path.name} {first.tensors[name][0]}"
                )
    for before, after in itertools.pairwise(infos):
        if after.t <= before.t:
            raise ValueError(
                f"snapshot {str(after.path)!r} has t={after.t}, not after {before.path.name} (t={before.t}): "
                "a resumed run left snapshots of its lost future? move them aside with discard_snapshots_after(folder, t)"
            )
    return infos


def _spans(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``'0-2, 5'``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def describe_run(run: str | None) -> str:
    """How an error names a run: its id, or the legacy run of snapshots written without one."""
    return f"run {run}" if run is not None else "a run without a run id (written before emakit recorded runs)"


def check_one_run(folder: Path, infos: Sequence[SnapshotInfo]) -> None:
    """ValueError naming the runs and their snapshots if ``infos`` were written by more than one run."""
    runs: dict[str | None, list[int]] = {}
    for info in infos:
        runs.setdefault(info.run, []).append(info.index)
    if len(runs) > 1:
        parts = "; ".join(f"snapshots {_spans(indices)} from {describe_run(run)}" for run, indices in runs.items())
        raise ValueError(
            f"snapshot folder {str(folder)!r} mixes the snapshots of {len(runs)} runs ({parts}): a reconstruction "
            "from them would combine unrelated averages. Keep one run's snapshots per folder: move the other "
            "run's snapshots to a folder of their own"
        )


def missing_snapshot_indices(infos: Sequence[SnapshotInfo]) -> list[int]:
    """The indices between 0 and the last snapshot's that ``infos`` lack (a file deleted or lost)."""
    present = {info.index for info in infos}
    return [i for i in range(max(present) + 1 if present else 0) if i not in present]


def describe_indices(missing: Sequence[int]) -> str:
    """``'snapshots 2-3, 7'`` for the snapshot indices ``[2, 3, 7]``."""
    return f"snapshot{'s' if len(missing) > 1 else ''} {_spans(missing)}"


class SnapshotReader:
    """Reads tensors of one snapshot, a few at a time, without a process group (whole tensors, any world size)."""

    def __init__(self, info: SnapshotInfo) -> None:
        self.info = info

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (``"{average}/{name}"``) as CPU tensors in their stored dtype."""
        if self.info.sharded:
            return _read_dcp(self.info.path, keys)
        with _safe_open()(str(self.info.path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in keys}


def _read_dcp(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    reader = dcp.FileSystemReader(path)
    sizes = reader.read_metadata().state_dict_metadata
    wanted = {key: torch.empty(sizes[key].size, dtype=sizes[key].properties.dtype) for key in keys}  # type: ignore[union-attr]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(wanted, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    except CheckpointException as e:  # a BaseException: give callers an ordinary error naming the file
        raise ValueError(f"snapshot {str(path)!r} could not be read: {e}") from None
    return wanted
