"""Checkpoint averaging: the (weighted) mean of several checkpoints' weights, written as one file.

Averaging the last few checkpoints of a run (LAWA, fairseq's ``average_checkpoints``, "model soups" of one
run) gives weights close to a long EMA's, after the fact. :func:`average_checkpoints` reads any format
:mod:`~emakit.checkpoint.weight_readers` reads, checks that every checkpoint holds the same tensors with the
same shapes and dtypes, and writes the mean:

- floating-point tensors: ``sum_i w_i * x_i`` with the weights normalised to sum to 1, accumulated in float64
  and written in the tensor's own dtype. float64 keeps the rounding of the sum (about K * 2**-53 relative for
  K checkpoints) far below the output's own rounding (2**-24 for float32), so the result is the exact mean
  rounded to the output dtype (an exact tie between two output values may go either way), whatever the
  count; unlike a float32 sum, it does not drift as checkpoints are added. It costs little memory, because
  only one group of tensors is accumulated at a time.
- integer and bool tensors (BatchNorm's ``num_batches_tracked``, step counters, masks) are taken from the
  last checkpoint listed with a non-zero weight: a mean of counters is not a counter, and a checkpoint of
  weight 0 is left out entirely.

Memory stays near a group of tensors, not K models: the tensors are processed in groups of about
``chunk_bytes`` of float64 accumulators (large tensors split by rows, unless a DCP directory, which is read
tensor by tensor, is among the inputs), and for each group every checkpoint
in turn is read (memory-mapped: only the group's pages are touched) and the memory that took is let go of
before the next. A ``.safetensors`` output is written group by group as it is computed; a ``.pt`` output is kept in
memory until the end (one model), as ``torch.save`` needs it whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from emakit.atomic import atomic_file, check_output_path
from emakit.checkpoint.weight_readers import (
    SAFETENSORS_DTYPES,
    WHICH,
    Piece,
    TensorInfo,
    WeightReader,
    open_weights,
)

__all__ = ["OUTPUT_SUFFIXES", "AveragedCheckpoint", "average_checkpoints", "normalize_weights"]

#: Output file suffixes: safetensors, or ``torch.save``.
OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class AveragedCheckpoint:
    """What :func:`average_checkpoints` wrote: the file, its sources and their normalised weights."""

    path: Path
    sources: tuple[Path, ...]
    weights: tuple[float, ...]
    averaged: int  # floating-point tensors averaged
    copied: int  # integer and bool tensors taken from the last checkpoint with a non-zero weight
    nbytes: int  # the size of one model's weights, as written
    moved_aside: Path | None  # where the file that ``path`` replaced (force=True) now is


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` scaled to sum to 1 (uniform when None); refused unless ``count`` finite, >= 0, not all 0."""
    if count < 1:
        raise ValueError(f"need at least one checkpoint to average, got {count}")
    if weights is None:
        return [1.0 / count] * count
    values = list(weights)
    if len(values) != count:
        raise ValueError(
            f"weights: got {len(values)} weights {values} for {count} checkpoints; give one per checkpoint"
        )
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights: weight {i + 1} is {w!r}; weights must be finite numbers >= 0")
    largest = max(values)
    if largest == 0:
        raise ValueError(f"weights: all {count} weights are 0; at least one must be positive")
    scaled = [w / largest for w in values]  # no overflow in the sum, however large the weights
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def average_checkpoints(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    which: str = "training",
    force: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> AveragedCheckpoint:
    """Write the weighted mean of the checkpoints at ``paths`` to ``out``; see the module's docstring.

    Args:
        paths: a list of checkpoints of one model, each given once: emakit ``.pt`` files or DCP directories, Lightning ``.ckpt`` files,
            ``.safetensors`` files, plain ``torch.save``-d state_dicts, Transformers checkpoint folders.
        out: the file to write, ``.safetensors`` or ``.pt`` (``.pth``, ``.bin``): a state_dict under the
            checkpoints' own names (``model.load_state_dict(...)`` loads it). Written to a temporary file and
            renamed, so ``out`` never holds a partial file; never one of the inputs, nor inside an input folder.
        weights: one non-negative weight per checkpoint, normalised to sum to 1; None for the plain mean.
        which: ``"training"`` or ``"ema"``: which weights to take from checkpoints that hold both (emakit's,
            Lightning's with emakit's EMACallback, Transformers folders with ``ema_weights.safetensors``).
        force: replace an existing ``out``; the old file is kept beside it as ``<name>.old`` (and said so in
            the result's ``moved_aside``). Without it an existing ``out`` is refused.
        chunk_bytes: float64 accumulator memory per group of tensors (tensors larger than this are split
            by rows, except with DCP inputs); the peak memory is a few times this (or the largest tensor),
            plus one model for a ``.pt`` output.

    Raises:
        TypeError: ``paths`` is one path, not a list.
        ValueError: bad weights, ``which`` or ``out`` suffix; a checkpoint given twice; ``out`` an input or inside
            one; checkpoints of different models (naming the first tensor that differs and the two files); a
            file in no format this reads.
        FileExistsError: ``out`` exists and ``force`` is false.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(
            f"paths must be a list of checkpoint paths, got a single path {os.fsdecode(paths)!r}: "
            "give [path, ...] (averaging one checkpoint copies it)"
        )
    sources = [Path(p) for p in paths]
    normalized = normalize_weights(weights, len(sources))
    if which not in WHICH:
        raise ValueError(f"which must be 'training' or 'ema', got {which!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    target = Path(out)
    _check_target(target, sources, force)
    readers = [open_weights(p, which) for p in sources]
    _check_same_model(readers)
    infos = readers[0].tensors
    writer: _Writer = _SafetensorsWriter(infos) if target.suffix == ".safetensors" else _TorchWriter(infos)
    with atomic_file(target, overwrite=force, what="out", hint=_FORCE) as f:
        writer.begin(f)
        for group in _groups(infos, chunk_bytes, split=all(r.reads_rows for r in readers)):
            for piece, tensor in _average_group(readers, normalized, group).items():
                writer.write(f, piece, tensor)
        writer.end(f)
        moved = _keep_aside(target)
    floating = sum(_is_averaged(info.dtype) for info in infos.values())
    return AveragedCheckpoint(
        path=target,
        sources=tuple(sources),
        weights=tuple(normalized),
        averaged=floating,
        copied=len(infos) - floating,
        nbytes=sum(_nbytes(info) for info in infos.values()),
        moved_aside=moved,
    )


def _is_averaged(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * info.dtype.itemsize


_FORCE = "pass force=True (--force)"


def _check_target(target: Path, sources: list[Path], force: bool) -> None:
    if target.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"out must end in {', '.join(OUTPUT_SUFFIXES)} (safetensors or torch.save), got {str(target)!r}"
        )
    seen: dict[tuple[int, int], int] = {}
    for i, source in enumerate(sources):
        if source.exists():
            info = source.stat()
            first = seen.setdefault((info.st_dev, info.st_ino), i)
            if first != i:
                raise ValueError(
                    f"paths: checkpoints {first + 1} and {i + 1} are the same file ({str(sources[first])!r} and "
                    f"{str(source)!r}); give each checkpoint once, and weights= to count one more than the others"
                )
    resolved = target.resolve()
    for source in sources:
        origin = source.resolve()
        if resolved == origin:
            raise ValueError(f"out {str(target)!r} is one of the checkpoints being averaged; write elsewhere")
        if origin in resolved.parents:
            raise ValueError(
                f"out {str(target)!r} is inside checkpoint {str(source)!r}, one of the inputs: writing there "
                "would change that checkpoint; write elsewhere"
            )
    check_output_path(target, overwrite=force, what="out", hint=_FORCE)


def _check_same_model(readers: list[WeightReader]) -> None:
    """Refuse checkpoints that do not hold the same tensor names, shapes and dtypes, naming the first difference."""
    first = readers[0]

    def describe(info: TensorInfo) -> str:
        return f"shape {tuple(info.shape)} {str(info.dtype).removeprefix('torch.')}"

    if not first.tensors:
        raise ValueError(f"checkpoint {str(first.path)!r} holds no tensors")
    for other in readers[1:]:
        for name, info in first.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                raise ValueError(
                    f"checkpoints of different models: tensor {name!r} is in {str(first.path)!r} "
                    f"but not in {str(other.path)!r}"
                )
            if theirs != info:
                raise ValueError(
                    f"checkpoints of different models: tensor {name!r} has {describe(info)} in "
                    f"{str(first.path)!r} but {describe(theirs)} in {str(other.path)!r}"
                )
        extra = next((name for name in other.tensors if name not in first.tensors), None)
        if extra is not None:
            raise ValueError(
                f"checkpoints of different models: tensor {extra!r} is in {str(other.path)!r} "
                f"but not in {str(first.path)!r}"
            )


def _groups(infos: dict[str, TensorInfo], chunk_bytes: int, *, split: bool = True) -> list[list[Piece]]:
    """The tensors in file order, cut into groups of about ``chunk_bytes`` of float64 (large ones by rows if ``split``)."""
    groups: list[list[Piece]] = []
    group: list[Piece] = []
    size = 0

    def add(piece: Piece, nbytes: int) -> None:
        nonlocal group, size
        if group and size + nbytes > chunk_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(piece)
        size += nbytes

    for name, info in infos.items():
        numel = math.prod(info.shape)
        width = 16 if info.dtype.is_complex else 8
        if not split or numel * width <= chunk_bytes or len(info.shape) == 0 or info.shape[0] < 2:
            add(Piece(name), numel * width)
            continue
        row = numel // info.shape[0] * width
        rows = max(1, chunk_bytes // max(row, 1))
        for start in range(0, info.shape[0], rows):
            stop = min(start + rows, info.shape[0])
            add(Piece(name, start, stop), (stop - start) * row)
    if group:
        groups.append(group)
    return groups


def _average_group(readers: list[WeightReader], weights: list[float], group: list[Piece]) -> dict[Piece, torch.Tensor]:
    """The group's pieces averaged (floating point) or taken from the last checkpoint with a non-zero weight
    (integer, bool)."""
    infos = readers[0].tensors
    floating = [p for p in group if _is_averaged(infos[p.name].dtype)]
    sums: dict[Piece, torch.Tensor | None] = dict.fromkeys(floating)
    result: dict[Piece, torch.Tensor] = {}
    last = max(i for i, w in enumerate(weights) if w > 0)
    for i, (reader, weight) in enumerate(zip(readers, weights, strict=True)):
        wanted = (floating if weight > 0 else []) + ([p for p in group if p not in sums] if i == last else [])
        if not wanted:
            continue
        got = reader.read(wanted)
        for piece in wanted:
            tensor = got[piece]
            if piece not in sums:
                result[piece] = tensor.clone()  # a copy: the read tensor is a view of a file about to be closed
                continue
            accumulated = torch.complex128 if tensor.dtype.is_complex else torch.float64
            current = sums[piece]
            # w * x, then the sum, each rounded to float64 (no fused multiply-add): the same numbers as the plain
            # loop ``sum(w * x.double())``. A copy even for float64 input: the read tensor maps the file.
            term = tensor.to(accumulated, copy=True).mul_(weight)
            if current is None:
                sums[piece] = term
            else:
                current.add_(term)
        del got
        reader.done()
    for piece, total in sums.items():
        assert total is not None  # at least one weight is positive
        result[piece] = total.to(infos[piece.name].dtype)
    return {piece: result[piece] for piece in group}


class _Writer:
    def begin(self, f: IO[bytes]) -> None:
        pass

    def write(self, f: IO[bytes], piece: Piece, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self, f: IO[bytes]) -> None:
        pass


class _SafetensorsWriter(_Writer):
    """Writes a safetensors file piece by piece: the header first (every shape is known), then the data in order."""

    def __init__(self, infos: dict[str, TensorInfo]) -> None:
        codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, info in infos.items():
            end = offset + _nbytes(info)
            header[name] = {"dtype": codes[info.dtype], "shape": list(info.shape), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        self.header = text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def begin(self, f: IO[bytes]) -> None:
        f.write(struct.pack("<Q", len(self.header)))
        f.write(self.header)

    def write(self, f: IO[bytes], piece: Piece, tensor: torch.Tensor) -> None:
        f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class _TorchWriter(_Writer):
    """Collects the averaged tensors and writes them with ``torch.save`` at the end."""

    def __init__(self, infos: dict[str, TensorInfo]) -> None:
        self.infos = infos
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, f: IO[bytes], piece: Piece, tensor: torch.Tensor) -> None:
        if piece.start is None:
            self.tensors[piece.name] = tensor
            return
        if piece.name not in self.tensors:
            info = self.infos[piece.name]
            self.tensors[piece.name] = torch.empty(info.shape, dtype=info.dtype)
        self.tensors[piece.name][piece.start : piece.stop] = tensor

    def end(self, f: IO[bytes]) -> None:
        torch.save(self.tensors, f)
        self.tensors = {}


def _keep_aside(target: Path) -> Path | None:
    """Give an existing ``target`` a second name ``<name>.old`` (``.old2``, ...) before it is replaced."""
    if not (target.exists() or target.is_symlink()):
        return None
    aside = target.with_name(target.name + ".old")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = target.with_name(f"{target.name}.old{n}")
    try:
        os.link(target, aside, follow_symlinks=False)  # both names hold it until the rename replaces ``target``
    except OSError:
        shutil.copy2(target, aside, follow_symlinks=False)
    return aside
