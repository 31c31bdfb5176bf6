"""safetensors files as emakit writes them: one tensor at a time, through :func:`emakit.atomic.atomic_file`.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range (and optional string metadata), then the little-endian bytes, 8-byte aligned. Each
:class:`TensorEntry` announces its shape and dtype before any tensor is read, so the header is written first and
each tensor is then read, written and dropped in turn: memory holds one tensor, not the model, and tensors may
share memory (views into one flat buffer), which ``safetensors.torch.save_file`` refuses. Exports, the EMA
weights of Transformers checkpoints, post-hoc snapshots and reconstructions are all written here.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from emakit.atomic import atomic_file

__all__ = ["SAFETENSORS_CODES", "TensorEntry", "tensor_entries", "write_safetensors"]

#: safetensors' dtype codes, the one table every safetensors writer and reader of emakit uses.
SAFETENSORS_CODES: dict[torch.dtype, str] = {
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
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to write: its name, whole shape and dtype, and ``read()``, which returns it whole on this
    process in that dtype (for a DTensor a gather: a collective, so every rank reads the entries in the same
    order)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_entries(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorEntry]:
    """Entries for tensors already in memory, (name, tensor) pairs, each written as it is (detached)."""
    return [TensorEntry(name, tuple(t.shape), t.dtype, t.detach) for name, t in tensors]


def _header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for entry in entries:
        if entry.dtype not in SAFETENSORS_CODES:
            raise ValueError(f"tensor {entry.name!r} has dtype {entry.dtype}, which safetensors files cannot hold")
        if entry.name in header:
            raise ValueError(f"tensor name {entry.name!r} appears twice")
        header[entry.name] = {
            "dtype": SAFETENSORS_CODES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of ``tensor``, copied to the CPU (no copy when it is contiguous there already)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy()
    if sys.byteorder != "little" and raw.dtype.itemsize > 1:
        raw = raw.byteswap()
    return raw.data.cast("B")


def write_safetensors(
    entries: Sequence[TensorEntry],
    path: str | Path,
    *,
    overwrite: bool,
    metadata: Mapping[str, str] | None = None,
    write: bool = True,
) -> Path | None:
    """Write ``entries`` to the safetensors file ``path``, reading each only when its turn comes; returns ``path``.

    ``metadata`` goes to the header's ``__metadata__``, beside ``"format": "pt"`` (Transformers loads only
    files that say so). ``write=False`` reads every entry (taking part in the gathers) and writes nothing: the other
    ranks' part; it returns None. The file appears under its name only once complete and synced
    (:func:`~emakit.atomic.atomic_file`); an existing ``path`` is replaced only with ``overwrite``.

    Raises:
        ValueError: a dtype safetensors cannot hold, or a name given twice (before anything is written).
        RuntimeError: an entry read with another shape or dtype than it announced.
    """
    if not write:
        for entry in entries:
            entry.read()
        return None
    path = Path(path)
    header = _header(entries, metadata)
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(header)
        for entry in entries:
            tensor = entry.read()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise RuntimeError(
                    f"tensor {entry.name!r} read as {tuple(tensor.shape)} {tensor.dtype}, "
                    f"announced as {entry.shape} {entry.dtype}"
                )
            if tensor.numel():
                f.write(_tensor_bytes(tensor))
            del tensor
    return path
