"""Model weights in checkpoint files of several formats, read a few tensors at a time.

:func:`open_weights` looks at a path and returns a :class:`WeightReader`: the names, shapes and dtypes of the
model weights it holds (read without reading the tensors), :meth:`WeightReader.read`, which returns the
requested tensors (or row ranges of them), and :meth:`WeightReader.done`, which lets go of the memory that
took, so that memory holds only what was asked for, however large the files. Formats:

- emakit checkpoints: a ``.pt`` file, or the DCP directory of a sharded run. ``which="training"`` gives the
  training weights, ``which="ema"`` the EMA's (a published checkpoint holds the EMA as ``state.model`` and
  the training weights in the EMA algorithm's state; a training checkpoint the other way round).
- Lightning ``.ckpt`` files: ``state_dict`` (with emakit's ``EMACallback``, the EMA; the training weights are
  then under ``training_state_dict``).
- safetensors files; a plain ``torch.save``-d state_dict of tensors.
- Transformers checkpoint folders: ``model.safetensors``, sharded ``model-0000X-of-0000N.safetensors`` with
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` (sharded with its index); ``which="ema"``
  reads ``ema_weights.safetensors``, which emakit's Transformers callback writes beside them.

Files holding one set of weights (safetensors, a plain state_dict) are read as they are for either ``which``.
``.pt`` files load once with ``torch.load(mmap=True, weights_only=True)``: tensors are paged in from the file
only when touched (and handed back after each group), and nothing in the file can run code. safetensors files
are opened for each group (their mapping is released only on close), DCP directories read for each group.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emakit.checkpoint.files import CHECKPOINT_FORMAT, check_checkpoint_format, unreadable_checkpoint
from emakit.checkpoint.sharded import is_sharded_checkpoint, read_sharded_checkpoint
from emakit.safetensors_file import SAFETENSORS_CODES

__all__ = ["SAFETENSORS_DTYPES", "WHICH", "Piece", "TensorInfo", "WeightReader", "open_weights"]

WHICH = ("training", "ema")

#: safetensors' dtype codes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}

EMA_WEIGHTS_FILE = "ema_weights.safetensors"  # what emakit's Transformers callback writes in checkpoint-N/
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_LIGHTNING_TRAINING = "training_state_dict"  # emakit.integrations.lightning.TRAINING_STATE_KEY

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class TensorInfo:
    """A weight's shape and the dtype it is written in."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Piece:
    """A tensor, or rows ``start:stop`` of it (along its first dimension)."""

    name: str
    start: int | None = None
    stop: int | None = None

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.start is None else tensor[self.start : self.stop]


class WeightReader:
    """The model weights of one checkpoint: :attr:`tensors` (name -> info, in the file's order) and :meth:`read`."""

    def __init__(
        self,
        path: Path,
        kind: str,
        tensors: dict[str, TensorInfo],
        read: Callable[[list[Piece]], dict[Piece, torch.Tensor]],
        done: Callable[[], None] | None = None,
        *,
        reads_rows: bool = True,
    ) -> None:
        self.path = path
        self.kind = kind
        self.tensors = tensors
        #: whether reading rows of a tensor reads only those rows (not for DCP, which reads whole tensors)
        self.reads_rows = reads_rows
        self._read = read
        self._done = done

    def read(self, pieces: list[Piece]) -> dict[Piece, torch.Tensor]:
        """The requested pieces in their stored dtype: often views of a mapped file, to be copied before :meth:`done`."""
        return self._read(pieces)

    def done(self) -> None:
        """The tensors of the last :meth:`read` are no longer used: let the memory they occupy go."""
        if self._done is not None:
            self._done()

    def __repr__(self) -> str:
        return f"WeightReader({str(self.path)!r}, {self.kind}, {len(self.tensors)} tensors)"


def open_weights(path: str | os.PathLike[str], which: str = "training") -> WeightReader:
    """A :class:`WeightReader` for the checkpoint at ``path``, choosing the format from what is there."""
    if which not in WHICH:
        raise ValueError(f"which must be 'training' or 'ema', got {which!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return _dcp_reader(path, which)
        return _transformers_reader(path, which)
    if path.suffix == ".safetensors":
        return _safetensors_reader(path)
    return _torch_reader(path, which)


# ------------------------------------------------------------------------------------------ safetensors
def _safetensors_reader(path: Path) -> WeightReader:
    return WeightReader(path, "safetensors", _safetensors_infos(path), lambda pieces: _read_safetensors(path, pieces))


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({e})") from e
    infos: dict[str, TensorInfo] = {}
    with handle as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            tensor_slice = f.get_slice(name)
            code = tensor_slice.get_dtype()
            if code not in SAFETENSORS_DTYPES:
                raise ValueError(f"{str(path)!r}: tensor {name!r} has dtype {code}, which emakit does not read")
            infos[name] = TensorInfo(tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[code])
    return infos


def _read_safetensors(path: Path, pieces: list[Piece]) -> dict[Piece, torch.Tensor]:
    from safetensors import safe_open

    out: dict[Piece, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for piece in pieces:
            if piece.start is None:
                out[piece] = f.get_tensor(piece.name)
            else:
                out[piece] = f.get_slice(piece.name)[piece.start : piece.stop]
    return out


# ------------------------------------------------------------------------------------------ torch files
def _load_torch_file(path: Path) -> tuple[Any, bool]:
    """``torch.load`` of ``path``, memory-mapped when it is in torch's zip format (any file since torch 1.6)."""
    mapped = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped), mapped
    except Exception as e:
        raise unreadable_checkpoint(path, e) from e


def _walk(root: Any, keys: KeyPath) -> Any:
    for key in keys:
        root = root[key]
    return root


def _torch_reader(path: Path, which: str) -> WeightReader:
    """Loads the file once (unpickling a large checkpoint takes seconds) and keeps it mapped; after each group the
    pages it touched are handed back (see :func:`_drop_file_pages`), so memory holds one group, not the file."""
    loaded, mapped = _load_torch_file(path)
    kind, locations = _torch_locations(loaded, path, which)
    infos = {name: _info(_walk(loaded, keys), dtype) for name, (keys, dtype) in locations.items()}
    touched: list[torch.Tensor] = []

    def read(pieces: list[Piece]) -> dict[Piece, torch.Tensor]:
        out = {piece: piece.of(_walk(loaded, locations[piece.name][0])) for piece in pieces}
        touched.extend(out.values())
        return out

    def done() -> None:
        if mapped:
            _drop_file_pages(touched)
        touched.clear()

    return WeightReader(path, kind, infos, read, done)


def _drop_file_pages(tensors: list[torch.Tensor]) -> None:
    """``madvise(MADV_DONTNEED)`` over the tensors' bytes: the kernel unmaps those pages of the read-only file
    mapping (they stay in the page cache, and are read again from it if touched again). Without it every page
    read stays in the process's resident memory until the whole file is unmapped. Linux only; elsewhere nothing.

    Only for tensors of ``torch.load(mmap=True)``: a private mapping of the file that nothing writes to.
    """
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        start = tensor.data_ptr()
        end = start + (sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True)) + 1) * (
            tensor.element_size()
        )
        start -= start % page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _info(tensor: Any, dtype: torch.dtype | None = None) -> TensorInfo:
    return TensorInfo(tuple(tensor.shape), dtype or tensor.dtype)


def _torch_locations(loaded: Any, path: Path, which: str) -> tuple[str, dict[str, tuple[KeyPath, torch.dtype | None]]]:
    """The format, and for each weight its key path in the loaded object (and the dtype it is written in)."""
    source = f"checkpoint {str(path)!r}"
    if isinstance(loaded, Mapping) and loaded.get("format") == CHECKPOINT_FORMAT:
        check_checkpoint_format(loaded, source)
        return "emakit checkpoint", _emakit_locations(loaded, which, source)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        key = "state_dict"
        if _LIGHTNING_TRAINING in loaded and which == "training":
            key = _LIGHTNING_TRAINING
        elif which == "ema" and _LIGHTNING_TRAINING not in loaded:
            raise ValueError(
                f"{source} holds no EMA weights: it has no {_LIGHTNING_TRAINING!r} entry, which emakit's Lightning "
                "EMACallback writes once its average has started (use which='training')"
            )
        return "Lightning checkpoint", _tensors_under(loaded[key], (key,), source)
    if isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return "state_dict", _tensors_under(loaded, (), source)
    what = f"a dict with keys {sorted(map(str, loaded))[:8]}" if isinstance(loaded, Mapping) else type(loaded).__name__
    raise ValueError(
        f"{source} holds {what}: expected an emakit checkpoint, a Lightning checkpoint (a 'state_dict' entry) or a "
        "state_dict of tensors"
    )


def _tensors_under(
    state: Mapping[str, Any], prefix: KeyPath, source: str
) -> dict[str, tuple[KeyPath, torch.dtype | None]]:
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {name!r} of its state_dict is a {type(value).__name__}, not a tensor")
    return {name: ((*prefix, name), None) for name in state}


def _emakit_locations(checkpoint: Mapping[str, Any], which: str, source: str) -> dict[str, tuple[KeyPath, Any]]:
    """Where an emakit checkpoint keeps the training or the EMA weights (see :mod:`~emakit.checkpoint.contents`).

    Works on the loaded checkpoint and on the skeleton of a DCP one (anything with ``shape`` and ``dtype``).
    """
    saved = checkpoint["state"]
    model = saved["model"]
    algorithms = saved.get("algorithms") or {}
    published = checkpoint.get("model_weights") == "published"
    found: dict[str, tuple[KeyPath, Any]] = {name: (("state", "model", name), None) for name in model}

    def beside(algorithm: str, entry: str) -> dict[str, tuple[KeyPath, Any]]:
        tensors = algorithms[algorithm][entry]
        unknown = [n for n in tensors if n not in model]
        if unknown:
            raise ValueError(f"{source}: {algorithm}'s {entry!r} has a tensor {unknown[0]!r} its model lacks")
        # the EMA's average is kept in fp32 for low-precision models; the model's weights have the model's dtype
        return {n: (("state", "algorithms", algorithm, entry, n), model[n].dtype) for n in tensors}

    if which == "training":
        moved = [
            a
            for a, s in algorithms.items()
            if isinstance(s, Mapping) and isinstance(s.get("training_weights"), Mapping)
        ]
        return {**found, **beside(moved[0], "training_weights")} if published and moved else found
    started = [a for a, s in algorithms.items() if isinstance(s, Mapping) and s.get("started") is True]
    if not started:
        raise ValueError(
            f"{source} holds no EMA weights: it has no EMA, or its EMA had not started when it was written"
        )
    if published:
        return found
    if not isinstance(algorithms[started[0]].get("ema"), Mapping):
        raise ValueError(f"{source} holds no EMA tensors")
    return {**found, **beside(started[0], "ema")}


# ------------------------------------------------------------------------------------------ DCP directories
@dataclass(frozen=True)
class _Stored:
    """A tensor in a DCP directory, known from its metadata alone."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _dcp_reader(path: Path, which: str) -> WeightReader:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    source = f"checkpoint {str(path)!r}"
    metadata = dcp.FileSystemReader(path).read_metadata()
    paths = metadata.planner_data or {}
    skeleton: dict[Any, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            keys = tuple(paths.get(fqn, (fqn,)))
            node = skeleton
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = _Stored(tuple(item.size), item.properties.dtype)

    def plain(keys: KeyPath) -> bool:
        return keys[0] in ("format", "version", "model_weights") or (
            len(keys) == 4 and keys[:2] == ("state", "algorithms") and keys[3] == "started"
        )

    flags = read_sharded_checkpoint(path, keep=plain)
    check_checkpoint_format(flags, source)
    skeleton.update({k: v for k, v in flags.items() if k != "state"})
    for algorithm, state in flags.get("state", {}).get("algorithms", {}).items():
        skeleton.setdefault("state", {}).setdefault("algorithms", {}).setdefault(algorithm, {}).update(state)
    if "model" not in skeleton.get("state", {}):
        raise ValueError(f"{source} holds no model weights")
    locations = _emakit_locations(skeleton, which, source)
    infos = {name: _info(_walk(skeleton, keys), dtype) for name, (keys, dtype) in locations.items()}

    def read(pieces: list[Piece]) -> dict[Piece, torch.Tensor]:
        wanted = {locations[p.name][0] for p in pieces}
        loaded = read_sharded_checkpoint(path, keep=lambda keys: keys in wanted)
        return {piece: piece.of(_walk(loaded, locations[piece.name][0])) for piece in pieces}

    return WeightReader(path, "emakit DCP checkpoint", infos, read, reads_rows=False)


# ------------------------------------------------------------------------------------------ Transformers folders
def _transformers_reader(folder: Path, which: str) -> WeightReader:
    if which == "ema":
        ema = folder / EMA_WEIGHTS_FILE
        if not ema.is_file():
            raise ValueError(
                f"checkpoint folder {str(folder)!r} holds no EMA weights: no {EMA_WEIGHTS_FILE}, which emakit's "
                "Transformers EMACallback writes in each checkpoint-N/ (use which='training')"
            )
        reader = _safetensors_reader(ema)
        reader.kind = "Transformers EMA weights"
        return reader
    files = _transformers_files(folder)
    readers = [_safetensors_reader(f) if f.suffix == ".safetensors" else _torch_reader(f, "training") for f in files]
    owner: dict[str, WeightReader] = {}
    infos: dict[str, TensorInfo] = {}
    for reader in readers:
        for name, info in reader.tensors.items():
            owner[name] = reader
            infos[name] = info

    def read(pieces: list[Piece]) -> dict[Piece, torch.Tensor]:
        out: dict[Piece, torch.Tensor] = {}
        for reader in readers:
            mine = [p for p in pieces if owner[p.name] is reader]
            if mine:
                out.update(reader.read(mine))
        return out

    def done() -> None:
        for reader in readers:
            reader.done()

    return WeightReader(folder, "Transformers checkpoint", infos, read, done)


def _transformers_files(folder: Path) -> list[Path]:
    for index_name in _HF_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{str(index)!r} is not a Transformers weight index ({e!r})") from e
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{str(index)!r} names {missing[0].name!r}, which is not in the folder")
            return files
    for name in _HF_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ValueError(
        f"folder {str(folder)!r} is neither an emakit DCP checkpoint (a .metadata file) nor a Transformers checkpoint "
        f"({', '.join(_HF_INDEXES + _HF_FILES)})"
    )
