"""Weights as Transformers' sharded safetensors layout, each file streamed by :mod:`emakit.safetensors_file`.

Every shape and dtype is known before any tensor is read (from the DTensors, or a checkpoint's metadata), so
each file's header is written first and each tensor read, written and dropped in turn: memory holds one tensor,
not the model. The sharded layout is what ``transformers`` and ``accelerate`` load:
``model-00001-of-0000N.safetensors`` files of at most ``max_shard_size`` bytes each (a larger tensor gets a
file of its own) and ``model.safetensors.index.json`` mapping each name to its file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from emakit.atomic import check_output_path, write_bytes
from emakit.safetensors_file import TensorEntry, write_safetensors

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "check_layout_target",
    "clear_layout",
    "layout_files",
    "parse_size",
    "plan_shards",
    "write_sharded_safetensors",
]

#: The file names Transformers looks for in a model folder.
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: int | str, argument: str = "max_shard_size") -> int:
    """A byte count from ``value``: a positive int, or a string such as ``'5GB'``, ``'500MiB'``, ``'1.5GB'``.

    Units as Transformers reads them: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024; no unit or
    ``B`` means bytes.
    """
    accepted = f"{argument} must be a positive number of bytes or a size such as '5GB' or '500MiB', got {value!r}"
    if isinstance(value, bool):
        raise ValueError(accepted)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(accepted)
        return value
    if not isinstance(value, str):
        raise ValueError(accepted)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(accepted)
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(accepted)
    return size


def plan_shards(entries: Sequence[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """``entries`` in order, cut into files of at most ``max_shard_size`` bytes (a larger tensor alone)."""
    shards: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + entry.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards or [[]]


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def layout_files(folder: Path) -> list[Path]:
    """The files of Transformers' weights layout in ``folder``: ``model.safetensors``, the index, the shards."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: (p.name != SINGLE_NAME, p.name != INDEX_NAME, p.name))


def check_layout_target(folder: Path, *, overwrite: bool) -> None:
    """Refuse a folder for a sharded export if it is a file, or (without ``overwrite``) holds weights of the layout.

    A loader finding ``model.safetensors`` beside an index (``from_pretrained`` prefers the single file, emakit's
    reader the index) would load whichever it prefers, maybe stale weights.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path {str(folder)!r} must be a folder for a sharded export (max_shard_size given)")
    check_output_path(folder / INDEX_NAME, overwrite=True)  # a parent that is a file
    found = layout_files(folder)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FileExistsError(
            f"path {str(folder)!r} holds {names} (an earlier export or save_pretrained): a sharded export beside "
            "them would leave stale weights for from_pretrained or emakit to load. Pass overwrite=True to replace "
            "them (those files are removed), or give an empty folder"
        )


def clear_layout(folder: Path, *, overwrite: bool) -> None:
    """:func:`check_layout_target`, then (only with ``overwrite``) remove the layout's files found there."""
    check_layout_target(folder, overwrite=overwrite)
    for stale in layout_files(folder):
        stale.unlink()


def write_sharded_safetensors(
    entries: Sequence[TensorEntry], folder: Path, max_shard_size: int, *, overwrite: bool, write: bool = True
) -> Path | None:
    """Write ``entries`` into ``folder`` in Transformers' layout, files of at most ``max_shard_size`` bytes.

    Several files: ``model-{i:05d}-of-{n:05d}.safetensors`` and ``model.safetensors.index.json`` (written
    last); everything in one file: ``model.safetensors`` alone, as ``save_pretrained`` does. A folder already
    holding files of that layout is refused; with ``overwrite`` they are removed first, so that a crash leaves
    an incomplete new layout (which loaders refuse), never old weights beside new ones. Returns ``folder``.
    """
    shards = plan_shards(entries, max_shard_size)
    if write:
        clear_layout(folder, overwrite=overwrite)
    if len(shards) == 1:
        return folder if write_safetensors(shards[0], folder / SINGLE_NAME, overwrite=False, write=write) else None
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(shard, folder / name, overwrite=False, write=write)
    if not write:
        return None
    index = {
        "metadata": {"total_size": sum(entry.nbytes for entry in entries)},
        "weight_map": {entry.name: name for name, shard in zip(names, shards, strict=True) for entry in shard},
    }
    write_bytes(folder / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode(), overwrite=False)
    return folder
