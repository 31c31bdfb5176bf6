"""Training on several processes: the user-facing namespace.

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
  single-file checkpoint holds; :func:`export_ema_weights` gathers the EMA into one plain file.

This module only re-exports: the code lives in :mod:`emakit.parallel` (ranks, shard helpers, launching,
data) and :mod:`emakit.checkpoint` (sharded checkpoints, export), so that low layers never import it.
"""

from emakit.checkpoint.export import export_ema_weights, model_weights
from emakit.checkpoint.sharded import (
    build_sharded_checkpoint,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    newest_sharded_checkpoint,
    read_sharded_checkpoint,
    save_sharded_checkpoint,
)
from emakit.parallel.data import set_sampler_epoch, shard_dataloader
from emakit.parallel.launch import (
    DEFAULT_TIMEOUT,
    PARALLELISMS,
    check_parallelism,
    init_distributed,
    launched_by_torchrun,
    note_peer_failure,
    prepare_model,
    resolve_device,
    resolve_parallelism,
    shard_model,
)
from emakit.parallel.ranks import all_reduce_sum, barrier, get_rank, get_world_size, is_distributed
from emakit.parallel.sharding import is_sharded_model, local_tensor, reshard_model, sharded_like

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
