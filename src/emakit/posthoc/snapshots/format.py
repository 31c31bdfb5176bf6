"""The snapshot folder's names and codes: the format's constants, the dtype codes of safetensors, the names of
snapshot files and directories and finding them in a folder, and the integer check of the public functions.

Shared by :mod:`~emakit.posthoc.snapshots.writing`, :mod:`~emakit.posthoc.snapshots.reading` and
:mod:`~emakit.posthoc.snapshots.series`; the format itself is described in :mod:`emakit.posthoc.snapshots`.
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path

import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "RAW",
    "READABLE_VERSIONS",
    "SAFETENSORS_CODES",
    "SHARDED_METADATA_FILE",
    "SNAPSHOT_DTYPES",
    "START",
    "snapshot_name",
]

FORMAT = "emakit.posthoc.snapshot"
#: The version written with raw weights (2); a snapshot of averages only is written as version 1, which emakit
#: releases before raw weights read too.
FORMAT_VERSION = 2
#: The versions this emakit reads: 1 (averages only) and 2 (optionally the raw weights and ``theta_0``).
READABLE_VERSIONS = (1, 2)
#: The prefix of the raw training weights' tensors at the snapshot (``"raw/{name}"``), beside the averages'
#: ``"{j}/{name}"``.
RAW = "raw"
#: The prefix of the training weights at the start of the averages (``theta_0``, ``"start/{name}"``), held by the
#: first snapshot of a series written with raw weights.
START = "start"
#: Key of the safetensors header metadata that holds a snapshot's JSON metadata.
METADATA_KEY = "emakit.posthoc"
#: The metadata file inside a sharded snapshot's directory.
SHARDED_METADATA_FILE = "snapshot.json"
#: Dtypes floating tensors may be stored in.
SNAPSHOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FILE = re.compile(r"snapshot-(\d{6,})\.safetensors")
_DIR = re.compile(r"snapshot-(\d{6,})")
_DCP_METADATA = ".metadata"
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
_SAFETENSORS_DTYPES = SAFETENSORS_CODES


def snapshot_name(index: int, sharded: bool = False) -> str:
    """The file (or, if ``sharded``, directory) name of snapshot ``index``."""
    return f"snapshot-{index:06d}" if sharded else f"snapshot-{index:06d}.safetensors"


def _entries(folder: Path) -> dict[int, list[Path]]:
    """The snapshots in ``folder`` by index (names only; hidden temporaries do not match)."""
    found: dict[int, list[Path]] = {}
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name) if entry.is_file() else _DIR.fullmatch(entry.name)
        if match and (entry.is_file() or entry.is_dir()):
            found.setdefault(int(match.group(1)), []).append(entry)
    return found


def _check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
