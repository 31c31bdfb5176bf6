"""Checkpoint files: the format check, atomic writes, ``weights_only`` reads, and finding files in a folder.

Nothing here knows what a checkpoint holds beyond its ``format`` and ``version`` entries.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from emakit.atomic import atomic_file, is_temporary_of

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "SAVED_NAME",
    "check_checkpoint_format",
    "list_checkpoints",
    "load_checkpoint_file",
    "newest_loadable_checkpoint",
    "read_checkpoint_file",
    "remove_stale_temporaries",
    "save_checkpoint_file",
    "saved_entries",
    "unreadable_checkpoint",
]


CHECKPOINT_FORMAT = "emakit.checkpoint"

CHECKPOINT_VERSION = 1


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` to ``path`` with ``torch.save`` through :func:`emakit.atomic.atomic_file`.

    A crash at any moment leaves either the previous file or the new one at ``path``, never a partial one; an
    existing ``path`` is replaced only with ``overwrite``.
    """
    with atomic_file(path, overwrite=overwrite) as f:
        torch.save(checkpoint, f)
    return Path(path)


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: a file cannot run code when loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder that is not a DCP checkpoint.
        ValueError: the file is not a readable emakit checkpoint (truncated, corrupt, foreign, a safetensors
            file of weights, or it carries objects other than tensors and plain data).
    """
    checkpoint = read_checkpoint_file(path)
    check_checkpoint_format(checkpoint, f"checkpoint {str(path)!r}")
    return checkpoint


def read_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors that name the file and say what is wrong.

    The reader of every ``.pt`` file emakit writes (checkpoints, the EMA state of the framework integrations);
    it does not check what the file holds.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {str(path)!r} is a folder, not a checkpoint: give a checkpoint file (ep{{E}}-ba{{B}}.pt), "
            "a DCP checkpoint directory (written by an FSDP run, with a .metadata file in it), or "
            f"save_folder={str(path)!r} with load_path='latest' to resume from the newest checkpoint in it"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if _is_safetensors(path):
        raise ValueError(
            f"checkpoint {str(path)!r} is a safetensors file: it holds weights only (as export_ema_weights and "
            "emakit posthoc write them), not a run to resume. Load it into a model with "
            "model.load_state_dict(safetensors.torch.load_file(path)); to resume, give an emakit checkpoint "
            "(ep{E}-ba{B}.pt in the save_folder)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # torch.load raises many kinds on damaged bytes (IndexError, KeyError, ...)
        raise unreadable_checkpoint(path, e) from e


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte little-endian header length, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def unreadable_checkpoint(path: str | os.PathLike[str], cause: BaseException) -> ValueError:
    """The error for a checkpoint that ``torch.load(weights_only=True)`` cannot read, saying what happened.

    Files holding objects that loading would have to run as code are "refused for safety"; empty,
    truncated or corrupt files are called what they are, with their size, and the newest older checkpoint
    in the same folder that reads back whole is named, if there is one.
    """
    path = Path(path)
    first_line = _first_line(cause)
    if isinstance(cause, pickle.UnpicklingError) and _would_run_code(path, cause):
        return ValueError(
            f"checkpoint {str(path)!r} was refused for safety: it holds objects other than tensors and plain data, "
            f"which loading would have to run as code ({first_line}). Load only files you trust with "
            "torch.load(path, weights_only=False)"
        )
    size = path.stat().st_size if path.is_file() else None
    what = "is empty (0 bytes)" if size == 0 else "is truncated or damaged" + (f" ({size:,} bytes)" if size else "")
    return ValueError(
        f"checkpoint {str(path)!r} {what}: torch.load failed with {first_line!r}. "
        "The write was probably interrupted (a crash, a full disk) or the file was changed afterwards."
        + _intact_predecessor(path)
    )


def _first_line(cause: BaseException) -> str:
    """What went wrong, in one line: for a weights_only refusal, the unpickler's own reason, without torch's
    advice to retry with ``weights_only=False`` (wrong for a damaged file, and unsafe for a foreign one)."""
    text = str(cause).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__


_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})


def _would_run_code(path: Path, cause: BaseException) -> bool:
    """Whether a file that ``weights_only`` refused holds objects that loading would have to run as code.

    Only a whole pickle can (the ``data.pkl`` of a torch.save zip, or the file itself): damaged bytes can
    make torch's unpickler report a "blocked global" too, and are damage, not a threat. torch names the
    blocked global for a whole pickle; without that, its opcodes are scanned (``pickletools`` runs nothing).
    The entries of a DCP directory are read one by one, so there torch's word is taken.
    """
    text = str(cause)
    blocked = "GLOBAL" in text and ("blocked" in text or "Unsupported global" in text)
    if path.is_dir():  # a DCP checkpoint: torch read each entry whole before refusing it
        return blocked
    opcodes = _pickle_opcodes(path)
    if opcodes is None:
        return False
    return blocked or any(name in _CODE_OPCODES for name in opcodes)


def _pickle_opcodes(path: Path) -> list[str] | None:
    """The opcodes of the pickle in ``path`` (a torch.save zip's ``data.pkl``), or None if it is not whole."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not pickles:
                    return None
                with archive.open(pickles[0]) as f:
                    return [op.name for op, _, _ in pickletools.genops(f)]
        with open(path, "rb") as f:
            return [op.name for op, _, _ in pickletools.genops(f)]
    except Exception:  # not a (whole) pickle: damaged, or some other format
        return None


def _intact_predecessor(path: Path) -> str:
    """A sentence naming the newest checkpoint older than ``path`` in its folder that reads back, or ''."""
    match = _CHECKPOINT_NAME.match(path.name)
    older = [p for p in list_checkpoints(path.parent) if p.name != path.name]
    if match:
        key = (int(match.group(2)), int(match.group(1)))
        older = [p for p in older if _order(p) < key]
    for candidate in reversed(older):
        try:
            torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception:
            continue
        return (
            f" The previous checkpoint in the folder, {candidate.name!r}, reads back whole: resume from it, or use "
            "load_path='latest', which skips damaged files."
        )
    return ""


def _order(path: Path) -> tuple[int, int]:
    match = _CHECKPOINT_NAME.match(path.name)
    assert match is not None
    return int(match.group(2)), int(match.group(1))


def check_checkpoint_format(checkpoint: object, source: str) -> None:
    """Raise ValueError unless ``checkpoint`` is a dict in the format and version this emakit writes."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{source} is not an emakit checkpoint (no 'format': {CHECKPOINT_FORMAT!r} entry). A plain state_dict "
            "saved with torch.save loads with model.load_state_dict(torch.load(path, weights_only=True))"
        )
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{source} has format version {checkpoint.get('version')!r}; this emakit reads version {CHECKPOINT_VERSION}"
        )


_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)\.pt$")


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files ``ep{E}-ba{B}.pt`` in ``folder``, oldest first (by batch, then epoch)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[tuple[int, int, Path]] = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(2)), int(match.group(1)), path))
    return [path for _, _, path in sorted(found)]


def newest_loadable_checkpoint(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that reads back whole, with its contents; None if there is none.

    A truncated or corrupt newer file (a crash mid-write on a filesystem without atomic rename, a disk
    error) is reported with a warning and skipped.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint_file(path)
        except ValueError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    return None


#: What the CheckpointSaver writes into a save_folder: checkpoint files or DCP folders, and the ``latest`` links.
SAVED_NAME = re.compile(r"ep\d+-ba\d+(?:\.pt)?|latest(?:\.pt)?")


def saved_entries(folder: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints (files and DCP folders) and ``latest`` links of a save_folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if SAVED_NAME.fullmatch(p.name)]
    step = re.compile(r"ep(\d+)-ba(\d+)")

    def order(path: Path) -> tuple[int, int, str]:
        match = step.match(path.name)
        return (int(match.group(2)), int(match.group(1)), path.name) if match else (2**63, 0, path.name)

    return sorted(found, key=order)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries of checkpoint writes that a crash interrupted in ``folder``; return them.

    Only emakit's own (:func:`emakit.atomic.temporary_path` names for a checkpoint or ``latest`` link): any other
    hidden ``.tmp`` file or folder is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if is_temporary_of(p, SAVED_NAME)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
