"""Writing one snapshot: checking the averages and profiles, then a safetensors file (plain tensors, rank 0) or a
DCP directory (DTensors, every rank writes its shards).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emakit._compat import dtensor_type
from emakit._version import __version__
from emakit.atomic import install, shared_temporary_path
from emakit.engine.naming import is_averaged
from emakit.parallel.ranks import barrier, meet
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile, Profile, profile_from_dict
from emakit.posthoc.snapshots.atomic import _cast, _write_json, write_safetensors
from emakit.posthoc.snapshots.format import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    RAW,
    SHARDED_METADATA_FILE,
    SNAPSHOT_DTYPES,
    START,
    _check_int,
    snapshot_name,
)

__all__ = [
    "write_snapshot",
]

#: How long the ranks writing a sharded snapshot wait for each other at its start.
SNAPSHOT_MEETING_TIMEOUT_S = 600.0


def _dtensor_type() -> type | None:
    return dtensor_type()


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


def _check_weights(weights: object, argument: str, first: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``raw`` or ``start``: the training weights by the averages' names and shapes."""
    if not isinstance(weights, Mapping) or set(weights) != set(first):
        names = sorted(set(weights) ^ set(first)) if isinstance(weights, Mapping) else []
        raise ValueError(
            f"{argument} must be a dict of the training weights by the averages' tensor names, got "
            + (f"a dict that differs in {names[0]!r}" if names else repr(type(weights).__name__))
        )
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != first[name].shape:
            shown = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{argument}[{name!r}] must be a tensor of shape {tuple(first[name].shape)}, got {shown}")
    return {name: weights[name] for name in first}


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
    run: str | None = None,
    overwrite: bool = False,
    raw: Mapping[str, torch.Tensor] | None = None,
    start: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write snapshot ``index`` of ``averages`` (one dict of tensors by canonical name per average) into ``folder``.

    ``profiles[j]`` is average ``j``'s profile; ``t`` the number of EMA updates so far (the averages' time axis),
    ``step`` the optimizer steps so far, ``update_interval`` the steps per update. Floating tensors are stored
    in ``dtype``. ``run`` identifies the run writing the series (readers refuse a folder mixing runs). An
    existing snapshot ``index`` (in either form) is replaced only with ``overwrite``; without it, one written by
    another process even while this one is being written is kept and FileExistsError raised.

    ``raw``: the training weights after update ``t`` (stored as ``"raw/{name}"``); ``start``: those at the start of
    the averages, ``theta_0`` (``"start/{name}"``, once per series, in its first snapshot). Both by the averages'
    names, in ``dtype`` too; each costs one model in that dtype. They serve the kernels that weigh the raw
    weights (BEMA's, the raw weights as a sweep candidate); a snapshot that has either is format version 2.

    Plain tensors make one safetensors file; under a process group only rank 0 writes it and no collective
    is made. If any tensor is a DTensor (FSDP2), every rank must call this: each writes its own shards into a
    DCP directory, no tensor is gathered.

    Returns:
        The path of the snapshot (also on ranks that wrote nothing).
    Raises:
        ValueError: bad arguments (each names the argument), or a value that overflows ``dtype``.
        FileExistsError: snapshot ``index`` exists in ``folder`` and ``overwrite`` is false.
    """
    folder = Path(folder)
    index = _check_int(index, "index", 0)
    t = _check_int(t, "t", 1)
    step = _check_int(step, "step", 0)
    update_interval = _check_int(update_interval, "update_interval", 1)
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, SNAPSHOT_DTYPES))}, got {dtype!r}")
    if run is not None and (not isinstance(run, str) or not run):
        raise ValueError(f"run must be a non-empty string or None, got {run!r}")
    names = _check_averages(averages)
    checked = _check_profiles(profiles, len(averages))
    extra = {
        prefix: _check_weights(weights, argument, averages[0])
        for prefix, argument, weights in ((RAW, "raw", raw), (START, "start", start))
        if weights is not None
    }
    dtensor = _dtensor_type()
    sharded = dtensor is not None and any(isinstance(x, dtensor) for a in averages for x in a.values())
    world_size, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if extra else 1,
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
    if run is not None:
        metadata["run"] = run
    for prefix in extra:
        metadata[prefix] = True
    path = folder / snapshot_name(index, sharded)
    keys = [(f"{j}/{name}", average[name]) for j, average in enumerate(averages) for name in names]
    keys += [(f"{prefix}/{name}", weights[name]) for prefix, weights in extra.items() for name in names]
    other = folder / snapshot_name(index, not sharded)  # the same index in the other form
    if sharded:
        metadata["names"] = names  # DCP's metadata does not keep the order
        stored = {k: _cast(x, dtype, f"tensor {k!r}") if is_averaged(x) else x.detach() for k, x in keys}
        _write_sharded(path, stored, metadata, rank, overwrite)
    elif rank == 0:
        _refuse_existing(path, other, overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, keys, {METADATA_KEY: json.dumps(metadata)}, float_dtype=dtype, overwrite=overwrite)
    if rank == 0 and overwrite:
        _remove(other)
    return path


def _refuse_existing(path: Path, other: Path, overwrite: bool) -> None:
    """FileExistsError if snapshot ``path`` exists, in its own form or the ``other`` one, unless ``overwrite``."""
    for existing in (path, other):
        if not overwrite and (existing.exists() or existing.is_symlink()):
            raise FileExistsError(f"snapshot {str(existing)!r} exists; pass overwrite=True to replace it")


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _write_sharded(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], rank: int, overwrite: bool
) -> None:
    import torch.distributed.checkpoint as dcp

    tmp = shared_temporary_path(path)
    refused = None
    if rank == 0:
        try:
            _refuse_existing(path, path.with_name(snapshot_name(metadata["index"])), overwrite)
        except FileExistsError as e:
            refused = e
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # an emakit temporary of this name: a crashed write of ``path``
            tmp.mkdir()
    meet("write_snapshot", SNAPSHOT_MEETING_TIMEOUT_S, error=refused)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))  # every rank writes its shards, synced
    if rank == 0:
        _write_json(tmp / SHARDED_METADATA_FILE, metadata)
        install(tmp, path, overwrite=overwrite)
    barrier()
