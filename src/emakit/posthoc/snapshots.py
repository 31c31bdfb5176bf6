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
``dtype`` (of the floating tensors), ``sharded``, ``world_size`` and ``averages``: one profile per average,
``{"kind": "power", "sigma_rel": s, "gamma": g}`` or ``{"kind": "half_life", "half_life_updates": h}``; sharded
snapshots add ``names``, the tensors' order (a safetensors file keeps it in its data offsets).

Writes are atomic: a hidden temporary (``.snapshot-000007.safetensors.tmp``, ``.snapshot-000007.tmp/``) is
written, synced to disk and renamed into place, then the folder is synced; readers ignore temporaries, so a
crash never leaves a partial snapshot. Floating tensors are stored in float32 (default), float16 or bfloat16;
integer and bool tensors as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import os
import re
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emakit._compat import dtensor_type
from emakit._version import __version__
from emakit.functional import is_averaged
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile, Profile, profile_from_dict

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "SHARDED_METADATA_FILE",
    "SNAPSHOT_DTYPES",
    "SnapshotInfo",
    "SnapshotReader",
    "discard_snapshots_after",
    "next_snapshot_index",
    "read_snapshot_index",
    "snapshot_name",
    "write_safetensors",
    "write_snapshot",
]

FORMAT = "emakit.posthoc.snapshot"
FORMAT_VERSION = 1
#: Key of the safetensors header metadata that holds a snapshot's JSON metadata.
METADATA_KEY = "emakit.posthoc"
#: The metadata file inside a sharded snapshot's directory.
SHARDED_METADATA_FILE = "snapshot.json"
#: Dtypes floating tensors may be stored in.
SNAPSHOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FILE = re.compile(r"snapshot-(\d{6,})\.safetensors")
_DIR = re.compile(r"snapshot-(\d{6,})")
_DCP_METADATA = ".metadata"
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def snapshot_name(index: int, sharded: bool = False) -> str:
    """The file (or, if ``sharded``, directory) name of snapshot ``index``."""
    return f"snapshot-{index:06d}" if sharded else f"snapshot-{index:06d}.safetensors"


# ---------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported here (e.g. Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor (no copy when it is already contiguous on the CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy()
    if sys.byteorder != "little" and raw.dtype.itemsize > 1:
        raw = raw.byteswap()
    return raw.data.cast("B")


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
    *,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``tensors`` (name, tensor) as a safetensors file at ``path``, atomically, one tensor at a time.

    Tensors are cast (floating ones to ``float_dtype`` if given) and copied to the CPU one by one, so the
    memory needed is one tensor's, and they may share memory (views into one flat buffer). The file reads with
    ``safetensors.safe_open`` / ``safetensors.torch.load_file``. It appears at ``path`` only once complete and
    synced (temporary file, fsync, rename, fsync of the folder).

    Raises:
        ValueError: a dtype safetensors cannot hold, or a finite value that ``float_dtype`` cannot represent.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    stored: list[torch.dtype] = []
    offset = 0
    for name, tensor in tensors:
        dtype = float_dtype if float_dtype is not None and is_averaged(tensor) else tensor.dtype
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors files cannot hold here")
        nbytes = tensor.numel() * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        stored.append(dtype)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for (name, tensor), dtype in zip(tensors, stored, strict=True):
                if tensor.numel():
                    f.write(_tensor_bytes(_cast(tensor, dtype, f"tensor {name!r}")))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _cast(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``tensor`` (detached) in ``dtype``; a finite value that becomes infinite is an error naming ``what``."""
    if tensor.dtype == dtype:
        return tensor.detach()
    cast = tensor.detach().to(dtype)
    if dtype.itemsize < tensor.dtype.itemsize:
        local_in = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard: checked without communication
        local_out = getattr(cast, "_local_tensor", cast)
        if not bool(torch.isfinite(local_out).all()) and bool(torch.isfinite(local_in).all()):
            raise ValueError(
                f"{what} has values beyond the range of {dtype}: store the snapshot with dtype=torch.float32"
            )
    return cast


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------- writing
def _dtensor_type() -> type | None:
    return dtensor_type()  # None until torch has loaded DTensor: no DTensor can exist before


def _check_profiles(profiles: Sequence[object], count: int) -> list[Profile]:
    if len(profiles) != count:
        raise ValueError(f"profiles must have one profile per average ({count}), got {len(profiles)}")
    out: list[Profile] = []
    for j, profile in enumerate(profiles):
        if isinstance(profile, (PowerProfile, HalfLifeProfile)):
            out.append(profile)
        elif isinstance(profile, Mapping):
            out.append(profile_from_dict(profile, f"profiles[{j}]"))
        else:
            raise TypeError(f"profiles[{j}] must be a PowerProfile, a HalfLifeProfile or a dict, got {profile!r}")
    return out


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_averages(averages: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if isinstance(averages, Mapping) or not isinstance(averages, Sequence) or not averages:
        raise ValueError(f"averages must be a non-empty list of dicts of tensors (one per average), got {averages!r}")
    for j, average in enumerate(averages):
        if not isinstance(average, Mapping) or not average:
            raise ValueError(f"averages[{j}] must be a non-empty dict of tensors by name")
    names = list(averages[0])
    for j, average in enumerate(averages):
        if set(average) != set(names):
            extra = sorted(set(average) ^ set(names))
            raise ValueError(f"averages[{j}] and averages[0] hold different tensor names (e.g. {extra[0]!r})")
        for name, tensor in average.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"averages[{j}][{name!r}] must be a tensor, got {type(tensor).__name__}")
            first = averages[0][name]
            if tensor.shape != first.shape:
                raise ValueError(
                    f"averages[{j}][{name!r}] has shape {tuple(tensor.shape)}, averages[0]'s has {tuple(first.shape)}"
                )
    return names


def write_snapshot(
    folder: str | os.PathLike[str],
    index: int,
    averages: Sequence[Mapping[str, torch.Tensor]],
    profiles: Sequence[Profile | Mapping[str, Any]],
    t: int,
    step: int,
    *,
    update_interval: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write snapshot ``index`` of ``averages`` (one dict of tensors by canonical name per average) into ``folder``.

    ``profiles[j]`` is average ``j``'s profile; ``t`` the number of EMA updates so far (the averages' time axis),
    ``step`` the optimizer steps so far, ``update_interval`` the steps per update. Floating tensors are stored
    in ``dtype``. An existing snapshot ``index`` is replaced (a resumed run writing it again).

    Plain tensors make one safetensors file; under a process group only rank 0 writes it and no collective
    is made. If any tensor is a DTensor (FSDP2), every rank must call this: each writes its own shards into a
    DCP directory, no tensor is gathered.

    Returns:
        The path of the snapshot (also on ranks that wrote nothing).
    Raises:
        ValueError: bad arguments (each names the argument), or a value that overflows ``dtype``.
    """
    folder = Path(folder)
    index = _check_int(index, "index", 0)
    t = _check_int(t, "t", 1)
    step = _check_int(step, "step", 0)
    update_interval = _check_int(update_interval, "update_interval", 1)
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, SNAPSHOT_DTYPES))}, got {dtype!r}")
    names = _check_averages(averages)
    checked = _check_profiles(profiles, len(averages))
    dtensor = _dtensor_type()
    sharded = dtensor is not None and any(isinstance(x, dtensor) for a in averages for x in a.values())
    world_size, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "emakit_version": __version__,
        "index": index,
        "t": t,
        "step": step,
        "update_interval": update_interval,
        "dtype": str(dtype).removeprefix("torch."),
        "sharded": sharded,
        "world_size": world_size if sharded else 1,
        "averages": [p.to_dict() for p in checked],
    }
    path = folder / snapshot_name(index, sharded)
    keys = [(f"{j}/{name}", average[name]) for j, average in enumerate(averages) for name in names]
    if sharded:
        metadata["names"] = names  # DCP's metadata does not keep the order
        stored = {k: _cast(x, dtype, f"tensor {k!r}") if is_averaged(x) else x.detach() for k, x in keys}
        _write_sharded(path, stored, metadata, rank)
        return path
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        stale = folder / snapshot_name(index, sharded=True)
        write_safetensors(path, keys, {METADATA_KEY: json.dumps(metadata)}, float_dtype=dtype)
        if stale.is_dir():  # the same index written sharded by an earlier run
            shutil.rmtree(stale)
    return path


def _write_sharded(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], rank: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))  # every rank writes its shards, synced
    if rank == 0:
        _write_json(tmp / SHARDED_METADATA_FILE, metadata)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        (path.parent / snapshot_name(metadata["index"])).unlink(missing_ok=True)  # an unsharded one of this index
    dist.barrier()


# ---------------------------------------------------------------------------------------------- reading
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


def _entries(folder: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name) if entry.is_file() else _DIR.fullmatch(entry.name)
        if match and (entry.is_file() or entry.is_dir()):
            found.setdefault(int(match.group(1)), []).append(entry)
    return found


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
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {metadata.get('format_version')!r}; this emakit reads {FORMAT_VERSION}"
        )
    for key in ("index", "t", "step", "update_interval"):
        if not isinstance(metadata.get(key), int) or isinstance(metadata.get(key), bool):
            raise ValueError(f"{where}: metadata {key!r} must be an integer, got {metadata.get(key)!r}")
    if metadata["index"] != index:
        raise ValueError(f"{where}: its metadata says index {metadata['index']}, its name says {index}")
    raw_profiles = metadata.get("averages")
    if not isinstance(raw_profiles, list) or not raw_profiles:
        raise ValueError(f"{where}: metadata 'averages' must be a non-empty list of profiles")
    profiles = tuple(profile_from_dict(p, f"{where}, averages[{j}]") for j, p in enumerate(raw_profiles))
    per_average: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{} for _ in profiles]
    for key, value in layout.items():
        head, _, name = key.partition("/")
        if not head.isdigit() or int(head) >= len(profiles) or not name:
            raise ValueError(f"{where} holds a tensor {key!r} that belongs to no average (0..{len(profiles) - 1})")
        per_average[int(head)][name] = value
    for j, tensors in enumerate(per_average[1:], start=1):
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
    )


def read_snapshot_index(folder: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot in ``folder``, in index order, after checking they belong to one series.

    Reads metadata and tensor layouts only. Hidden temporaries of interrupted writes are ignored.

    Raises:
        FileNotFoundError / NotADirectoryError: ``folder`` is missing or not a directory.
        ValueError: ``folder`` holds no snapshot; an index appears twice (as a file and a directory); a
            snapshot is unreadable or not emakit's; or snapshots disagree on the averages' profiles,
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
                "a resumed run left snapshots of its lost future? remove them with discard_snapshots_after(folder, t)"
            )
    return infos


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
