"""What the snapshots write: their tensors as safetensors entries (cast one at a time, for
:mod:`emakit.safetensors_file`) and their small JSON files, both through :mod:`emakit.atomic` (renamed into place
only once complete and synced to disk).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from emakit.atomic import write_bytes
from emakit.engine.naming import is_averaged
from emakit.safetensors_file import TensorEntry

__all__ = ["DtypeOverflowError", "cast_entries"]


class DtypeOverflowError(ValueError):
    """A finite value that the dtype asked for cannot represent (it would be stored as Inf)."""


def cast_entries(tensors: Sequence[tuple[str, torch.Tensor]], float_dtype: torch.dtype) -> list[TensorEntry]:
    """Entries writing ``tensors`` (name, tensor), floating ones cast to ``float_dtype`` one at a time as they are
    written, so the memory needed is one tensor's; a finite value the cast makes infinite is a
    :class:`DtypeOverflowError`."""
    entries = []
    for name, tensor in tensors:
        dtype = float_dtype if is_averaged(tensor) else tensor.dtype
        entries.append(TensorEntry(name, tuple(tensor.shape), dtype, partial(_cast, tensor, dtype, f"tensor {name!r}")))
    return entries


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
