"""The snapshots' safetensors writer (one tensor at a time, views into one flat buffer included) and their small
JSON files, both through :mod:`emakit.atomic` (renamed into place only once complete and synced to disk).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emakit.atomic import atomic_file, write_bytes
from emakit.engine.naming import is_averaged
from emakit.posthoc.snapshots.format import _SAFETENSORS_DTYPES

__all__ = [
    "DtypeOverflowError",
    "write_safetensors",
]


class DtypeOverflowError(ValueError):
    """A finite value that the dtype asked for cannot represent (it would be stored as Inf)."""


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    overwrite: bool,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``tensors`` (name, tensor) as a safetensors file at ``path``, atomically, one tensor at a time.

    Tensors are cast (floating ones to ``float_dtype`` if given) and copied to the CPU one by one, so the
    memory needed is one tensor's, and they may share memory (views into one flat buffer). The file reads with
    ``safetensors.safe_open`` / ``safetensors.torch.load_file``. It appears at ``path`` only once complete and
    synced (:func:`emakit.atomic.atomic_file`); an existing ``path`` is replaced only with ``overwrite``.

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
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, tensor), dtype in zip(tensors, stored, strict=True):
            if tensor.numel():
                f.write(_tensor_bytes(_cast(tensor, dtype, f"tensor {name!r}")))
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
            raise DtypeOverflowError(
                f"{what} has values beyond the range of {dtype}: store the snapshot with dtype=torch.float32"
            )
    return cast


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_bytes(path, json.dumps(data, indent=1).encode(), overwrite=True)
