"""torch.distributed glue: launches, process groups, DDP and FSDP2, sharded checkpoints, EMA export.

The :class:`~emakit.Trainer` uses these helpers itself, so a script that trains on one process trains on
several under ``torchrun --nproc_per_node=N script.py`` unchanged:

- Launch: ``torchrun``'s environment variables are detected and the process group is joined (gloo on CPU,
  nccl on CUDA) with a timeout, so a rank that stops answering fails the launch instead of hanging it.
- DDP keeps every rank's parameters and buffers identical, so every rank's EMA stays identical without
  communication; names are canonical (no ``module.``), so checkpoints move between 1 and N processes.
- FSDP2 (``fully_shard``) makes each parameter a DTensor sharded along dim 0. The EMA keeps this rank's
  shards only (about 1/N of the full average per rank) and updates them with no communication; swapping
  EMA weights in for evaluation writes shards into shards.
- Checkpoints of sharded runs are torch.distributed.checkpoint (DCP) directories holding what a
  single-file checkpoint holds, with sharded tensors saved as shards, the optimizer state keyed by
  parameter name, and every rank's RNG. :func:`export_ema_weights` gathers the EMA into one plain file.

torch.distributed.tensor (slow to import) is only imported once something sharded exists.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from emakit.checkpoint import (
    build_checkpoint,
    check_checkpoint_format,
    load_checkpoint_file,
    model_state_dict,
    save_checkpoint_file,
    unreadable_checkpoint,
)
from emakit.functional import canonical_name, unwrap_model

if TYPE_CHECKING:
    from emakit.core.state import State

__all__ = [
    "DEFAULT_TIMEOUT",
    "PARALLELISMS",
    "all_reduce_sum",
    "barrier",
    "build_sharded_checkpoint",
    "check_parallelism",
    "export_ema_weights",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_sharded_checkpoint",
    "is_sharded_model",
    "launched_by_torchrun",
    "load_sharded_checkpoint",
    "local_tensor",
    "model_weights",
    "newest_sharded_checkpoint",
    "note_peer_failure",
    "prepare_model",
    "read_sharded_checkpoint",
    "reshard_model",
    "resolve_device",
    "resolve_parallelism",
    "save_sharded_checkpoint",
    "set_sampler_epoch",
    "shard_dataloader",
    "shard_model",
    "sharded_like",
]

PARALLELISMS = ("ddp", "fsdp")
#: How long a collective waits for the other ranks before failing the run.
DEFAULT_TIMEOUT = timedelta(minutes=10)
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_METADATA = ".metadata"


# ---------------------------------------------------------------------------------------------- launch and ranks
def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)."""
    env = os.environ if environ is None else environ
    return all(env.get(name) for name in _TORCHRUN_VARIABLES)


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def _env_int(name: str, environ: Mapping[str, str]) -> int:
    value = environ.get(name, "0")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}")
    return number


def _as_timedelta(timeout: float | timedelta, name: str = "dist_timeout") -> timedelta:
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"{name} must be a number of seconds or a datetime.timedelta, got {timeout!r}")
    if not seconds > 0:
        raise ValueError(f"{name} must be greater than 0 seconds, got {timeout!r}")
    return timedelta(seconds=seconds)


def resolve_device(device: torch.device, environ: Mapping[str, str] | None = None) -> torch.device:
    """``device`` with the launch's local GPU for an index-less CUDA device under torchrun (``cuda:LOCAL_RANK``)."""
    env = os.environ if environ is None else environ
    if device.type == "cuda" and device.index is None and launched_by_torchrun(env):
        return torch.device("cuda", _env_int("LOCAL_RANK", env))
    return device


def _destroy_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def init_distributed(device: torch.device, timeout: float | timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group of a ``torchrun`` launch; return whether this process is in a process group.

    A group the caller initialised already is used as it is. Otherwise, under torchrun, the group is
    created with gloo for CPU devices and nccl for CUDA ones, and destroyed at exit. ``timeout`` (seconds
    or a timedelta) bounds every collective: when a rank dies or stops answering, the others fail with a
    timeout error after it instead of waiting forever, and torchrun ends the launch.
    """
    limit = _as_timedelta(timeout)
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed support")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        _env_int(name, os.environ)
    if device.type == "cuda":
        torch.cuda.set_device(resolve_device(device))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=limit)
    atexit.register(_destroy_group)
    return True


_PEER_FAILURE_SIGNS = ("timed out", "connection closed by peer", "connection reset by peer")


def note_peer_failure(error: BaseException, rank: int, world_size: int) -> None:
    """Add a note to the error of a collective that failed because another rank died or stopped answering."""
    text = str(error).lower()
    if world_size > 1 and any(sign in text for sign in _PEER_FAILURE_SIGNS) and hasattr(error, "add_note"):
        error.add_note(
            f"emakit: rank {rank} of {world_size} failed in a collective operation because another rank died or "
            "stopped answering (collectives wait at most Trainer(dist_timeout=...)); the launcher's summary names "
            "the first rank that failed, and that rank's log shows why"
        )


def check_parallelism(parallelism: object) -> str | None:
    """Return ``parallelism`` after checking it is None, ``'ddp'`` or ``'fsdp'``."""
    if parallelism is not None and parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be None, 'ddp' or 'fsdp', got {parallelism!r}")
    return parallelism


def resolve_parallelism(parallelism: str | None, distributed: bool, world_size: int) -> str | None:
    """The parallelism to use: ``parallelism``, or ``'ddp'`` for a multi-process launch that named none.

    Raises:
        ValueError: ``parallelism`` is not None/'ddp'/'fsdp', or it was asked for without a process group.
    """
    check_parallelism(parallelism)
    if parallelism is not None and not distributed:
        raise ValueError(
            f"parallelism={parallelism!r} needs a torch.distributed launch: run under torchrun "
            "(e.g. `torchrun --nproc_per_node=2 train.py`) or initialise a process group first"
        )
    if parallelism is None and distributed and world_size > 1:
        return "ddp"
    return parallelism


# ---------------------------------------------------------------------------------------------- models
def _dtensor_type() -> type | None:
    # No DTensor can exist before torch.distributed.tensor is imported; checking sys.modules avoids the import.
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded by FSDP2 or another DTensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its memory), or ``tensor`` itself if it is not one."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        local = getattr(tensor, "_local_tensor", None)
        return local if isinstance(local, torch.Tensor) else tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def sharded_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard, not copied) as a DTensor sharded like ``like``; ``local`` if ``like`` is plain."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(like, dtensor):
        return local
    return dtensor.from_local(  # type: ignore[attr-defined]
        local,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def reshard_model(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state (a forward in eval mode leaves the root unsharded).

    Reading or writing parameter shards is only meaningful while the sharded parameters are registered.
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _broadcast_from_rank0(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard_model(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> nn.Module:
    """Shard ``model`` across the ranks with FSDP2's ``fully_shard`` (in place) and return it.

    Every rank starts from rank 0's weights (broadcast first, as DDP does). The whole model is one FSDP
    group; for finer groups (one per block) call ``fully_shard`` yourself before building the Trainer.
    FSDP2 replaces the parameter objects: ``optimizers`` that have no state yet are pointed at the new ones.

    Raises:
        ValueError: an optimizer already has state (it would keep updating the replaced parameters).
    """
    from torch.distributed.fsdp import fully_shard

    for opt in optimizers:
        if opt.state:
            raise ValueError(
                "an optimizer with state was given for parallelism='fsdp': sharding replaces the parameters it "
                "holds; create the optimizer after sharding (emakit.distributed.shard_model(model)) or before any step"
            )
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if is_distributed():
        _broadcast_from_rank0(model)
    fully_shard(model)
    sharded = dict(model.named_parameters(remove_duplicate=False))
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [sharded[names[id(p)]] if id(p) in names else p for p in group["params"]]
    return model


def prepare_model(
    model: nn.Module,
    parallelism: str | None,
    device: torch.device,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> nn.Module:
    """Wrap ``model`` for ``parallelism``: DDP, FSDP2 (:func:`shard_model`), or unchanged for None.

    A model the caller already wrapped in DDP or sharded is returned as it is.
    """
    check_parallelism(parallelism)
    if parallelism is None or isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded_model(model):
        return model
    if parallelism == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return shard_model(model, optimizers)


# ---------------------------------------------------------------------------------------------- data and metrics
def shard_dataloader(
    loader: Iterable[Any], *, world_size: int, rank: int, seed: int | None, what: str = "dataloader"
) -> Iterable[Any]:
    """``loader`` rebuilt with a :class:`~torch.utils.data.DistributedSampler`, so each rank reads its part.

    Rebuilt: a plain DataLoader over a map-style dataset with its default sampler (shuffled loaders get a
    shuffling sampler seeded with ``seed``, 0 if None); batch size, collate_fn, workers, drop_last and
    the rest are kept. Returned as they are: loaders that already use a DistributedSampler, and (with a
    warning, since every rank would read all of it) anything else. The sampler pads the dataset to a
    multiple of ``world_size`` by repeating samples, so every rank runs the same number of batches.
    """
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        DistributedSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
    )

    if world_size <= 1:
        return loader
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return loader
    if (
        type(loader) is not DataLoader
        or isinstance(loader.dataset, IterableDataset)
        or loader.batch_size is None
        or type(loader.batch_sampler) is not BatchSampler
        or type(sampler) not in (RandomSampler, SequentialSampler)
        or (isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None))
    ):
        warnings.warn(
            f"{what} is not a DataLoader with a default sampler, so it cannot be split across the "
            f"{world_size} ranks: every rank reads all of it. Give it a DistributedSampler to split it.",
            stacklevel=3,
        )
        return loader
    distributed_sampler: DistributedSampler = DistributedSampler(
        loader.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=isinstance(sampler, RandomSampler),
        seed=seed if seed is not None else 0,
    )
    options: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "sampler": distributed_sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **options)


def set_sampler_epoch(loader: object, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``loader``'s DistributedSampler, so each epoch shuffles differently."""
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (``values`` unchanged without a process group)."""
    if not is_distributed() or get_world_size() == 1:
        return [float(v) for v in values]
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return [float(v) for v in totals.tolist()]


# ---------------------------------------------------------------------------------------------- DCP checkpoints
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


def _replace_dir(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_sharded_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` as the DCP directory ``path``; every rank calls this (each writes its shards).

    DCP writes into a temporary sibling directory that rank 0 renames to ``path`` once every rank's
    files and the metadata are on disk, so ``path`` never holds a partial checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(checkpoint, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not is_distributed())
    if get_rank() == 0:
        _replace_dir(tmp, path)
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
    from emakit.checkpoint import _unique_names

    return _unique_names(state.algorithms)


# ---------------------------------------------------------------------------------------------- EMA export
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
        return {**saved["model"], **ema} if isinstance(ema, Mapping) else None

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
    """Write the EMA weights as one file that loads into the plain, unsharded model:

        model.load_state_dict(torch.load(path, weights_only=True))

    ``source`` is a running :class:`~emakit.Trainer` or :class:`~emakit.EMA` (under FSDP every rank must
    call this: the shards are gathered), or the path of a checkpoint, a DCP directory or a ``.pt`` file
    (no communication; call it from one process or from all). The file holds the whole model
    ``state_dict`` under canonical names, with the EMA's average in place of the tracked tensors. Only
    rank 0 writes; it returns ``path`` there and None on other ranks.

    Raises:
        ValueError: the source has no EMA, or its EMA has not started.
    """
    from emakit.algorithms.ema import EMA
    from emakit.trainer import Trainer

    target = Path(path)
    live = not isinstance(source, (str, os.PathLike))
    if isinstance(source, (str, os.PathLike)):
        weights = _ema_weights_from_checkpoint(Path(source))
    else:
        if isinstance(source, Trainer):
            emas = [a for a in source.state.algorithms if isinstance(a, EMA)]
            if len(emas) != 1:
                raise ValueError(f"source must be a Trainer with exactly one EMA algorithm, it has {len(emas)}")
            source = emas[0]
        if not isinstance(source, EMA):
            raise TypeError(f"source must be a Trainer, an EMA or a checkpoint path, got {type(source).__name__}")
        source._require_started()
        model = source._model
        assert model is not None
        reshard_model(model)
        weights = source.checkpoint_model_state(model_state_dict(model), {}, publish=True)
    full = {name: _gathered(tensor) for name, tensor in weights.items()}
    written: Path | None = None
    if get_rank() == 0 or not is_distributed():
        written = save_checkpoint_file(full, target)
    if live:
        barrier()
    return written


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        tensor = tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor.detach().cpu().clone()


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict under canonical names, with sharded tensors gathered whole (a collective under FSDP)."""
    reshard_model(model)
    return {name: _gathered(t) for name, t in model_state_dict(model).items()}
