"""Writing weights in safetensors format one tensor at a time, as one file or as Transformers' sharded layout.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Every shape and dtype is known before any tensor is read (from the
DTensors, or a checkpoint's metadata), so the header is written first and each tensor is read, written and
dropped in turn: memory holds one tensor, not the model. ``save_file`` from safetensors needs every tensor
at once. The sharded layout is what ``transformers`` and ``accelerate`` load: ``model-00001-of-0000N.safetensors``
files of at most ``max_shard_size`` bytes each (a larger tensor gets a file of its own) and
``model.safetensors.index.json`` mapping each name to its file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from emakit.checkpoint.files import fsync_dir
from emakit.posthoc.snapshots.format import SAFETENSORS_CODES

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "TensorEntry",
    "parse_size",
    "plan_shards",
    "write_safetensors",
    "write_sharded_safetensors",
]

#: The file names Transformers looks for in a model folder.
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = SAFETENSORS_CODES
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


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to write: its name, whole shape and dtype, and ``read()``, which returns it whole on this
    process (for a DTensor a gather: a collective, so every rank reads the entries in the same order)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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


def _header(entries: Sequence[TensorEntry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        if entry.dtype not in _DTYPES:
            raise ValueError(f"tensor {entry.name!r} has dtype {entry.dtype}, which safetensors cannot hold")
        if entry.name in header:
            raise ValueError(f"tensor name {entry.name!r} appears twice")
        header[entry.name] = {
            "dtype": _DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def write_safetensors(entries: Sequence[TensorEntry], path: Path, *, write: bool = True) -> Path | None:
    """Write ``entries`` to the safetensors file ``path``, reading each only when its turn comes.

    ``write=False`` reads every entry (taking part in the gathers) and writes nothing: the other ranks'
    part. The file appears under its name only once complete.
    """
    if not write:
        for entry in entries:
            entry.read()
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_header(entries))
            for entry in entries:
                tensor = entry.read()
                if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                    raise RuntimeError(
                        f"tensor {entry.name!r} read as {tuple(tensor.shape)} {tensor.dtype}, "
                        f"announced as {entry.shape} {entry.dtype}"
                    )
                if tensor.numel():
                    f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del tensor
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_sharded_safetensors(
    entries: Sequence[TensorEntry], folder: Path, max_shard_size: int, *, write: bool = True
) -> Path | None:
    """Write ``entries`` into ``folder`` in Transformers' layout, files of at most ``max_shard_size`` bytes.

    Several files: ``model-{i:05d}-of-{n:05d}.safetensors`` and ``model.safetensors.index.json`` (written
    last); everything in one file: ``model.safetensors`` alone, as ``save_pretrained`` does. Returns ``folder``.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path {str(folder)!r} must be a folder for a sharded export (max_shard_size given)")
    shards = plan_shards(entries, max_shard_size)
    if len(shards) == 1:
        written = write_safetensors(shards[0], folder / SINGLE_NAME, write=write)
        return None if written is None else folder
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(shard, folder / name, write=write)
    if not write:
        return None
    index = {
        "metadata": {"total_size": sum(entry.nbytes for entry in entries)},
        "weight_map": {entry.name: name for name, shard in zip(names, shards, strict=True) for entry in shard},
    }
    tmp = folder / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / INDEX_NAME)
    fsync_dir(folder)
    return folder
