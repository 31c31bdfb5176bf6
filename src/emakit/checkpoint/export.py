"""Exporting the EMA weights as plain files that load into the unsharded model.

The weights are gathered and written one tensor at a time: safetensors files (one, or Transformers' sharded
layout with ``max_shard_size``) are streamed, so no process ever holds the whole model, also when reading a
DCP checkpoint offline. A ``.pt`` file is one ``torch.save`` of the whole dict: rank 0 holds the model then.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.atomic import check_output_path
from emakit.averaging import Averager
from emakit.checkpoint.contents import model_state_dict
from emakit.checkpoint.files import check_checkpoint_format, load_checkpoint_file, save_checkpoint_file
from emakit.checkpoint.sharded import (
    LIGHTNING_EMA_KEY,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
    read_sharded_tensor,
    sharded_tensor_index,
)
from emakit.checkpoint.streaming import (
    SINGLE_NAME,
    check_layout_target,
    clear_layout,
    parse_size,
    write_sharded_safetensors,
)
from emakit.engine.naming import canonical_name, unwrap_model
from emakit.parallel.ranks import barrier, get_rank, is_distributed, meet
from emakit.parallel.sharding import gathered, reshard_model
from emakit.parallel.zero import gather_partition, partition, zero3_parameters
from emakit.safetensors_file import TensorEntry, write_safetensors

__all__ = ["ARRIVAL_TIMEOUT_S", "export_ema_weights", "model_weights"]


def _entry(name: str, tensor: torch.Tensor, zero3: nn.Parameter | None = None) -> TensorEntry:
    if zero3 is not None:  # ``tensor`` is this rank's ZeRO-3 partition, laid out as ``zero3``'s
        return TensorEntry(name, tuple(zero3.ds_shape), tensor.dtype, partial(gather_partition, tensor, zero3))  # type: ignore[attr-defined]
    return TensorEntry(name, tuple(tensor.shape), tensor.dtype, partial(gathered, tensor))


def _read_cast(path: Path, keys: tuple[Any, ...], dtype: torch.dtype) -> torch.Tensor:
    return read_sharded_tensor(path, keys).to(dtype)


def _entries_from_file(path: Path, source: str) -> list[TensorEntry]:
    checkpoint = load_checkpoint_file(path)
    saved = checkpoint["state"]
    started = _started(saved, source)
    if checkpoint.get("model_weights") == "published":
        weights = dict(saved["model"])
    else:
        ema = started.get("ema")
        if not isinstance(ema, Mapping):
            raise ValueError(f"{source} holds no EMA tensors")
        model = saved["model"]
        # the average is kept in fp32 for low-precision models; published weights have the model's dtype
        weights = {**model, **{n: t.to(model[n].dtype) if n in model else t for n, t in ema.items()}}
    return [_entry(name, t) for name, t in weights.items() if isinstance(t, torch.Tensor)]


def _started(saved: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """The first started algorithm's state in a checkpoint's ``state``."""
    for algorithm in saved.get("algorithms", {}).values():
        if isinstance(algorithm, Mapping) and algorithm.get("started") is True:
            return algorithm
    raise ValueError(f"{source} holds no EMA weights: its EMA had not started when it was written")


def _entries_from_dcp(path: Path, source: str) -> list[TensorEntry]:
    """The EMA weights of a DCP checkpoint folder (emakit's or Lightning's), each read from disk when written."""
    index = sharded_tensor_index(path)
    if any(k[0] == "state_dict" for k in index) and not any(k[0] == "state" for k in index):
        # Lightning ModelParallelStrategy: the EMACallback published the average as the module's state_dict
        if not any(k[:3] == ("state_dict", LIGHTNING_EMA_KEY, "ema") for k in index):
            raise ValueError(
                f"{source} holds no EMA weights: it was not written with emakit's EMACallback, or before its "
                "EMA started"
            )
        return [
            TensorEntry(k[1], shape, dtype, partial(read_sharded_tensor, path, k))
            for k, (shape, dtype) in index.items()
            if len(k) == 2 and k[0] == "state_dict"
        ]

    def scalars(keys: tuple[Any, ...]) -> bool:
        if keys[0] in ("format", "version", "model_weights"):
            return True
        return len(keys) == 4 and keys[:2] == ("state", "algorithms") and keys[3] == "started"

    checkpoint = read_sharded_checkpoint(path, keep=scalars)
    check_checkpoint_format(checkpoint, source)
    started = _started(checkpoint["state"], source)
    algorithm = next(name for name, a in checkpoint["state"]["algorithms"].items() if a is started)
    model = {
        k[2]: (k, shape, dtype) for k, (shape, dtype) in index.items() if len(k) == 3 and k[:2] == ("state", "model")
    }
    if checkpoint.get("model_weights") == "published":
        ema: dict[str, tuple[tuple[Any, ...], tuple[int, ...], torch.dtype]] = {}
    else:
        prefix = ("state", "algorithms", algorithm, "ema")
        ema = {k[4]: (k, shape, dtype) for k, (shape, dtype) in index.items() if len(k) == 5 and k[:4] == prefix}
        if not ema:
            raise ValueError(f"{source} holds no EMA tensors")
    entries = []
    for name in [*model, *(n for n in ema if n not in model)]:
        keys, shape, dtype = ema.get(name) or model[name]
        dtype = model[name][2] if name in model else dtype
        entries.append(TensorEntry(name, shape, dtype, partial(_read_cast, path, keys, dtype)))
    return entries


#: How long the ranks of a live export wait for each other before failing (a call made on rank 0 only).
ARRIVAL_TIMEOUT_S = 120.0


def export_ema_weights(
    source: Any, path: str | os.PathLike[str], *, max_shard_size: int | str | None = None, overwrite: bool = False
) -> Path | None:
    """Write the EMA weights as files that load into the plain, unsharded model.

    ``source`` is an averager (:class:`~emakit.EMA`, :class:`~emakit.SWA`), anything that runs exactly one
    (emakit's ``Trainer``, the Lightning or Transformers callbacks: an object with an ``averager`` attribute or a
    ``state.algorithms`` list),
    or the path of a checkpoint (a DCP folder, emakit's or Lightning ModelParallelStrategy's with the
    EMACallback, or a ``.pt`` file; read without a process group, from one process or all). Under FSDP or
    tensor parallelism every rank must call it with a live source: the shards are gathered, one tensor at a
    time. The files hold the whole model ``state_dict`` under canonical names, with the EMA's average, in the
    model's dtype, in place of the tracked tensors.

    - ``path`` ending in ``.safetensors``: one safetensors file, written as each tensor is gathered (memory:
      one tensor); ``model.load_state_dict(safetensors.torch.load_file(path))``.
    - ``max_shard_size`` (bytes, or ``'5GB'``, ``'500MiB'``): ``path`` is a folder that receives Transformers'
      sharded layout, ``model-00001-of-0000N.safetensors`` files of at most that size and
      ``model.safetensors.index.json`` (or ``model.safetensors`` alone if one file holds everything), which
      ``from_pretrained`` and ``accelerate`` load; streamed likewise.
    - anything else: one ``torch.save`` file (``torch.load(path, weights_only=True)``); rank 0 holds the
      whole model to write it.

    Only rank 0 writes; it returns the path written there (the folder for a sharded export), None elsewhere.
    An existing file at ``path`` (for a sharded export: ``model.safetensors``, an index or shards in the folder,
    which a loader could take for the new weights) is replaced only with ``overwrite=True``; the checkpoint
    being exported is never written over. Under a process group, ranks that do not all call it within
    :data:`ARRIVAL_TIMEOUT_S` seconds get an error, not a hang.

    Raises:
        ValueError: the source has no EMA, or its EMA has not started; a bad ``max_shard_size``; ``path`` is the
            source checkpoint, is under a file, or names a ``.safetensors`` file with ``max_shard_size``.
        FileExistsError: ``path`` (or a file of the sharded layout in it) exists and ``overwrite`` is false.
    """
    shard_size = None if max_shard_size is None else parse_size(max_shard_size)
    target = Path(path)
    live = not isinstance(source, (str, os.PathLike))
    writer = get_rank() == 0 or not is_distributed()
    refused = None
    if writer:
        try:
            _check_target(source, target, max_shard_size, overwrite)
        except (ValueError, OSError) as e:
            refused = e
    if live and is_distributed():
        meet("export_ema_weights", ARRIVAL_TIMEOUT_S, error=refused, hint=_EVERY_RANK)
    elif refused is not None:
        raise refused
    extra: dict[str, Any] = {}
    if not live:
        checkpoint = Path(source)
        where = f"checkpoint {str(checkpoint)!r}"
        entries = _entries_from_dcp(checkpoint, where) if is_sharded_checkpoint(checkpoint) else None
        if entries is None:
            entries = _entries_from_file(checkpoint, where)
    else:
        ema = _find_ema(source)
        ema.wait()
        model = ema.model
        reshard_model(model)
        # ZeRO-3: this rank's partitions in, each gathered whole when its turn to be written comes
        zero3 = {canonical_name(n): p for n, p in zero3_parameters(unwrap_model(model)).items()}
        state = {name: partition(zero3[name]) if name in zero3 else t for name, t in model_state_dict(model).items()}
        weights = ema.published_model_state(state)
        entries = [_entry(name, t, zero3.get(name)) for name, t in weights.items() if isinstance(t, torch.Tensor)]
        extra = {name: value for name, value in weights.items() if not isinstance(value, torch.Tensor)}
    if not live and not writer:  # nothing to gather from a checkpoint: rank 0 reads and writes alone
        return None
    written: Path | None
    if shard_size is not None:
        written = write_sharded_safetensors(entries, target, shard_size, overwrite=overwrite, write=writer)
    elif target.suffix == ".safetensors":
        if writer and target.name == SINGLE_NAME:
            clear_layout(target.parent, overwrite=overwrite)
        written = write_safetensors(entries, target, overwrite=overwrite, write=writer)
    else:
        whole: dict[str, Any] = {}
        for entry in entries:  # every rank takes part in each gather; only rank 0 keeps the tensors
            tensor = entry.read()
            if writer:
                whole[entry.name] = tensor
        written = save_checkpoint_file({**whole, **extra}, target, overwrite=overwrite) if writer else None
    if live:
        barrier()
    return written


_EVERY_RANK = (
    "Under FSDP or tensor parallelism the weights are gathered from all ranks: call export_ema_weights on every "
    "rank, not inside `if rank == 0:` (only rank 0 writes the file)"
)


def _check_target(source: Any, target: Path, max_shard_size: int | str | None, overwrite: bool) -> None:
    """Refuse ``target`` before any work: see :func:`export_ema_weights`' Raises."""
    if isinstance(source, (str, os.PathLike)):
        resolved, origin = target.resolve(), Path(source).resolve()
        if resolved == origin or origin in resolved.parents:
            raise ValueError(
                f"path {str(target)!r} is the checkpoint being exported (source {str(source)!r}), or inside it: "
                "writing there would replace the run's checkpoint; give another path"
            )
    if max_shard_size is not None:
        if target.suffix == ".safetensors":
            raise ValueError(
                f"max_shard_size={max_shard_size!r} writes a folder (Transformers' sharded layout), but path "
                f"{str(target)!r} names a file: give a folder, or leave max_shard_size out to write one file"
            )
        check_layout_target(target, overwrite=overwrite)
        return
    check_output_path(target, overwrite=overwrite)
    if target.suffix == ".safetensors" and target.name == SINGLE_NAME:
        check_layout_target(target.parent, overwrite=overwrite)


def _find_ema(source: Any) -> Averager:
    """The started averager ``source`` is or holds (a callback's or :class:`Averaging`'s ``averager``)."""
    if isinstance(source, Averager):
        found = source
    elif isinstance(getattr(source, "averager", None), Averager):
        found = source.averager
    elif isinstance(getattr(getattr(source, "state", None), "algorithms", None), list):
        held = [a.averager for a in source.state.algorithms if isinstance(getattr(a, "averager", None), Averager)]
        if len(held) != 1:
            raise ValueError(f"source must run exactly one averager (EMA or SWA), it has {len(held)}")
        found = held[0]
    else:
        raise TypeError(
            "source must be a Trainer, an averager (EMA, SWA), a checkpoint path or a callback holding an "
            f"averager, got {source!r}"
        )
    found.require_started()
    return found


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict under canonical names, with sharded tensors gathered whole (a collective under FSDP)."""
    reshard_model(model)
    return {name: gathered(t) for name, t in model_state_dict(model).items()}
