"""Exporting the EMA weights as one plain file that loads into the unsharded model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.averaging import EMA
from emakit.checkpoint.contents import model_state_dict
from emakit.checkpoint.files import check_checkpoint_format, fsync_dir, load_checkpoint_file, save_checkpoint_file
from emakit.checkpoint.sharded import is_sharded_checkpoint, read_sharded_checkpoint
from emakit.parallel.ranks import barrier, get_rank, is_distributed
from emakit.parallel.sharding import gathered, reshard_model

__all__ = ["export_ema_weights", "model_weights"]


def _ema_weights_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    source = f"checkpoint {str(path)!r}"

    def weights_in(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        saved = checkpoint["state"]
        started = [
            a for a in saved.get("algorithms", {}).values() if isinstance(a, Mapping) and a.get("started") is True
        ]
        if not started:
            raise ValueError(f"{source} holds no EMA weights: its EMA had not started when it was written")
        if checkpoint.get("model_weights") == "published":
            return dict(saved["model"])
        ema = started[0].get("ema")
        if not isinstance(ema, Mapping):
            return None
        model = saved["model"]
        # the average is kept in fp32 for low-precision models; published weights have the model's dtype
        return {**model, **{n: t.to(model[n].dtype) if n in model else t for n, t in ema.items()}}

    if not is_sharded_checkpoint(path):
        checkpoint = load_checkpoint_file(path)
        found = weights_in(checkpoint)
        if found is None:
            raise ValueError(f"{source} holds no EMA tensors")
        return found

    def wanted(keys: tuple[Any, ...], with_ema: bool) -> bool:
        if keys[0] in ("format", "version", "model_weights") or keys[:2] == ("state", "model"):
            return True
        return (
            len(keys) > 3
            and keys[:2] == ("state", "algorithms")
            and (keys[3] == "started" or (with_ema and keys[3] == "ema"))
        )

    checkpoint = read_sharded_checkpoint(path, keep=lambda keys: wanted(keys, False))
    check_checkpoint_format(checkpoint, source)
    found = weights_in(checkpoint)
    if found is None:
        checkpoint = read_sharded_checkpoint(path, keep=lambda keys: wanted(keys, True))
        found = weights_in(checkpoint)
    if found is None:
        raise ValueError(f"{source} holds no EMA tensors")
    return found


def export_ema_weights(source: Any, path: str | os.PathLike[str]) -> Path | None:
    """Write the EMA weights as one file that loads into the plain, unsharded model.

    ``source`` is an :class:`~emakit.EMA`, anything that runs exactly one (emakit's ``Trainer``, the
    Lightning or Transformers callbacks: an object with an ``ema`` attribute or a ``state.algorithms`` list),
    or the path of a checkpoint (a DCP directory or a ``.pt`` file; no communication, call it from one
    process or from all). Under FSDP every rank must call it with a live source: the shards are gathered.
    The file holds the whole model ``state_dict`` under canonical names, with the EMA's average, in the
    model's dtype, in place of the tracked tensors. A path ending in ``.safetensors`` is written with
    safetensors (``model.load_state_dict(safetensors.torch.load_file(path))``), anything else with
    ``torch.save`` (``model.load_state_dict(torch.load(path, weights_only=True))``). Only rank 0 writes; it
    returns ``path`` there and None on other ranks.

    Raises:
        ValueError: the source has no EMA, or its EMA has not started.
    """
    target = Path(path)
    live = not isinstance(source, (str, os.PathLike))
    if not live:
        weights = _ema_weights_from_checkpoint(Path(source))
    else:
        ema = _find_ema(source)
        ema.wait()
        model = ema.model
        reshard_model(model)
        weights = ema.published_model_state(model_state_dict(model))
    written: Path | None = None
    full = {name: gathered(tensor) for name, tensor in weights.items()}
    if get_rank() == 0 or not is_distributed():
        written = _write_weights(full, target)
    if live:
        barrier()
    return written


def _find_ema(source: Any) -> EMA:
    if isinstance(source, EMA):
        found = source
    elif isinstance(getattr(source, "ema", None), EMA):
        found = source.ema
    elif isinstance(getattr(getattr(source, "state", None), "algorithms", None), list):
        emas = [a for a in source.state.algorithms if isinstance(a, EMA)]
        if len(emas) != 1:
            raise ValueError(f"source must run exactly one EMA algorithm, it has {len(emas)}")
        found = emas[0]
    else:
        raise TypeError(
            f"source must be a Trainer, an EMA or a checkpoint path (or a callback with an `ema`), got {source!r}"
        )
    found.require_started()
    return found


def _write_weights(weights: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix != ".safetensors":
        return save_checkpoint_file(weights, path)
    from safetensors.torch import save_file  # optional dependency: only for .safetensors paths

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # safetensors refuses tensors that share memory; the EMA's are views of one buffer, so copy each.
    save_file({name: t.contiguous().clone() for name, t in weights.items()}, str(tmp))
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict under canonical names, with sharded tensors gathered whole (a collective under FSDP)."""
    reshard_model(model)
    return {name: gathered(t) for name, t in model_state_dict(model).items()}
