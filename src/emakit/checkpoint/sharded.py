"""Checkpoints of sharded runs: torch.distributed.checkpoint (DCP) directories.

They hold what a single-file checkpoint holds, with sharded tensors (model, EMA, optimizer state) saved
shard by shard, the optimizer state keyed by parameter name, and every rank's RNG. Every rank writes its
own shards; no rank gathers the model.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.atomic import install, shared_temporary_path
from emakit.checkpoint.contents import build_checkpoint, unique_names
from emakit.checkpoint.files import check_checkpoint_format, unreadable_checkpoint
from emakit.core.state import State
from emakit.engine.naming import canonical_name, unwrap_model
from emakit.parallel.ranks import barrier, get_rank, get_world_size, is_distributed
from emakit.parallel.sharding import local_tensor, reshard_model, sharded_like

__all__ = [
    "LIGHTNING_EMA_KEY",
    "build_sharded_checkpoint",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "newest_sharded_checkpoint",
    "read_sharded_checkpoint",
    "read_sharded_tensor",
    "save_sharded_checkpoint",
    "sharded_tensor_index",
]


_METADATA = ".metadata"
#: The entry of a Lightning ModelParallelStrategy checkpoint's ``state_dict`` where emakit's EMACallback
#: keeps the training weights and the EMA's tensors (the module's own keys hold the EMA weights).
LIGHTNING_EMA_KEY = "emakit:ema"


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DCP checkpoint directory (it holds a ``.metadata`` file)."""
    return (Path(path) / _METADATA).is_file()


def newest_sharded_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest DCP checkpoint directory ``ep{E}-ba{B}`` in ``folder`` (by batch, then epoch), or None.

    Directories appear under their name only once complete (see :func:`save_sharded_checkpoint`).
    """
    folder = Path(folder)
    found: list[tuple[int, int, Path]] = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = re.fullmatch(r"ep(\d+)-ba(\d+)", path.name)
            if match and not path.is_symlink() and is_sharded_checkpoint(path):
                found.append((int(match.group(2)), int(match.group(1)), path))
    return max(found)[2] if found else None


def build_sharded_checkpoint(state: State, *, publish: bool) -> dict[str, Any]:
    """The checkpoint of a sharded run: what :func:`~emakit.checkpoint.build_checkpoint` holds, with

    - sharded tensors (the model's, the EMA's, the optimizer's) as DTensors, which DCP saves shard by shard;
    - ``state.optimizers``: one optimizer state keyed by parameter name (DCP's ``get_optimizer_state_dict``);
    - ``state.rng``: ``{"rank{r}": rng state}`` for this rank (each rank draws its own random numbers).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard_model(state.model)
    checkpoint = build_checkpoint(state, publish=publish)
    saved = checkpoint["state"]
    saved["optimizers"] = get_optimizer_state_dict(state.model, state.optimizers) if state.optimizers else {}
    saved["rng"] = {f"rank{get_rank()}": saved["rng"]}
    saved["world_size"] = get_world_size()
    return checkpoint


def save_sharded_checkpoint(
    checkpoint: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``checkpoint`` as the DCP directory ``path``; every rank calls this (each writes its shards).

    DCP writes into a temporary sibling directory that rank 0 renames to ``path`` once every rank's
    files and the metadata are on disk, so ``path`` never holds a partial checkpoint; an existing ``path`` is
    replaced only with ``overwrite``.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = shared_temporary_path(path)
    if get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # an emakit temporary of this name: a crashed save of ``path``
        tmp.mkdir(parents=True)
    barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(checkpoint, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not is_distributed())
    if get_rank() == 0:
        install(tmp, path, overwrite=overwrite)
    barrier()
    return path


def _safe_load_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Reads non-tensor entries with ``torch.load(weights_only=True)``: loading cannot run code."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)


def _nest(flat: Mapping[str, Any], paths: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Rebuild the nested dicts and lists that DCP flattened into ``fqn -> value`` (``paths``: fqn -> keys)."""
    root: dict[Any, Any] = {}
    for fqn, value in flat.items():
        keys = list(paths.get(fqn, (fqn,)))
        node = root
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and all(isinstance(k, int) for k in node):  # list elements were flattened one by one
            return [node.get(i) for i in range(max(node) + 1)]
        return node

    return lists(root)


def read_sharded_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    keep: Callable[[tuple[Any, ...]], bool] | None = None,
) -> dict[str, Any]:
    """Read the DCP checkpoint at ``path`` into nested dicts shaped as it was saved.

    Tensors of ``model``'s sharded parameters (its own, and anything saved under a parameter's name with
    its shape: EMA and optimizer state) are read as this rank's shards; everything else is read whole.
    Without ``model`` every tensor is read whole, in any process. ``keep(keys)`` selects entries by their
    key path, e.g. ``('state', 'model', 'fc.weight')``. Non-tensor entries load with ``weights_only``.
    No collective is involved: any subset of ranks may call this.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{str(path)!r} is not a DCP checkpoint directory (no {_METADATA} file in it)")
    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    paths: Mapping[str, Sequence[Any]] = metadata.planner_data or {}
    sharded: dict[str, torch.Tensor] = {}
    if model is not None:
        sharded = {canonical_name(n): p for n, p in unwrap_model(model).named_parameters() if local_tensor(p) is not p}
    flat: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        keys = tuple(paths.get(fqn, (fqn,)))
        if keep is not None and not keep(keys):
            continue
        if not isinstance(item, TensorStorageMetadata):
            flat[fqn] = None
            continue
        like = next((sharded[k] for k in keys if isinstance(k, str) and sharded.get(k) is not None), None)
        if like is not None and like.shape == item.size:
            shard = local_tensor(like)
            flat[fqn] = sharded_like(torch.empty(shard.shape, dtype=item.properties.dtype, device=shard.device), like)
        else:
            flat[fqn] = torch.empty(item.size, dtype=item.properties.dtype)
    planner = _safe_load_planner()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(flat, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointException as e:  # a BaseException: give callers an ordinary error naming the cause
        cause = next(iter(e.failures.values()))[0] if e.failures else e
        raise unreadable_checkpoint(path, cause) from cause
    return _nest({fqn: planner.state_dict[fqn] for fqn in flat}, paths)


def sharded_tensor_index(path: str | os.PathLike[str]) -> dict[tuple[Any, ...], tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the DCP checkpoint at ``path``: key path -> (whole shape, dtype), from its metadata alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{str(path)!r} is not a DCP checkpoint directory (no {_METADATA} file in it)")
    metadata = dcp.FileSystemReader(Path(path)).read_metadata()
    paths = metadata.planner_data or {}
    return {
        tuple(paths.get(fqn, (fqn,))): (tuple(item.size), item.properties.dtype)
        for fqn, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def read_sharded_tensor(path: str | os.PathLike[str], keys: tuple[Any, ...]) -> torch.Tensor:
    """The tensor at key path ``keys`` of the DCP checkpoint at ``path``, whole; only its bytes are read."""
    node: Any = read_sharded_checkpoint(path, keep=lambda found: found == keys)
    for key in keys:
        if not isinstance(node, (dict, list)) or (isinstance(node, dict) and key not in node):
            raise KeyError(f"checkpoint {str(path)!r} holds no tensor at {keys}")
        node = node[key]
    if not isinstance(node, torch.Tensor):
        raise KeyError(f"checkpoint {str(path)!r} holds no tensor at {keys}")
    return node


def load_sharded_checkpoint(state: State, path: str | os.PathLike[str]) -> tuple[dict[str, Any], Callable[[], None]]:
    """Read the DCP checkpoint at ``path`` for resuming ``state``: ``(checkpoint, load_optimizers)``.

    Pass both to :func:`~emakit.checkpoint.apply_checkpoint`. A sharded model reads its shards; an
    unsharded one (DDP or one process) reads whole tensors, so an FSDP checkpoint also resumes without
    FSDP. The checkpoint's ``state.rng`` is this rank's RNG state (rank 0's if it has none for this rank).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    source = f"checkpoint {str(path)!r}"
    rank_key = f"rank{get_rank()}"
    rng_keys = {
        keys[2]
        for keys in _checkpoint_keys(path)
        if len(keys) > 2 and keys[0] == "state" and keys[1] == "rng" and isinstance(keys[2], str)
    }
    own_rng = rank_key if rank_key in rng_keys else "rank0"

    def keep(keys: tuple[Any, ...]) -> bool:
        return not (len(keys) > 2 and keys[:2] == ("state", "rng") and keys[2] != own_rng)

    reshard_model(state.model)
    checkpoint = read_sharded_checkpoint(path, state.model, keep)
    check_checkpoint_format(checkpoint, source)
    saved = checkpoint["state"]
    # DCP stores no empty dicts: give back the ones a checkpoint may have had.
    saved.setdefault("schedulers", [])
    saved.setdefault("callbacks", {})
    algorithms = saved.setdefault("algorithms", {})
    for name in _algorithm_names(state):
        algorithms.setdefault(name, {})
    if own_rng not in saved.get("rng", {}):
        raise ValueError(f"{source} holds no RNG state")
    saved["rng"] = saved["rng"][own_rng]
    optimizer_state = saved.get("optimizers") or {}
    if bool(optimizer_state) != bool(state.optimizers):
        raise ValueError(
            f"{source} has {'an' if optimizer_state else 'no'} optimizer state, the trainer has "
            f"{len(state.optimizers)} optimizer(s)"
        )
    if optimizer_state:
        optimizer_state.setdefault("state", {})

    def load_optimizers() -> None:
        if state.optimizers:
            set_optimizer_state_dict(state.model, state.optimizers, optimizer_state)

    return checkpoint, load_optimizers


def _checkpoint_keys(path: str | os.PathLike[str]) -> list[tuple[Any, ...]]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(Path(path)).read_metadata()
    paths = metadata.planner_data or {}
    return [tuple(paths.get(fqn, (fqn,))) for fqn in metadata.state_dict_metadata]


def _algorithm_names(state: State) -> list[str]:
    return unique_names(state.algorithms)
