"""torch.distributed below the trainer: rank queries, DTensor shard helpers, launching, data splitting.

Layered so that the EMA can use the shard helpers without importing anything that launches or trains:
``ranks`` and ``sharding`` import nothing of emakit; ``launch`` and ``data`` import only those two; ``teacher``
(a module sharded like an FSDP2 model over given shards: the EMA teacher) imports ``sharding``.
The user-facing namespace is :mod:`emakit.distributed`, which also re-exports the sharded checkpoints
and the EMA export.
"""

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
from emakit.parallel.sharding import gathered, is_sharded_model, local_tensor, reshard_model, sharded_like

__all__ = [
    "DEFAULT_TIMEOUT",
    "PARALLELISMS",
    "all_reduce_sum",
    "barrier",
    "check_parallelism",
    "gathered",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_sharded_model",
    "launched_by_torchrun",
    "local_tensor",
    "note_peer_failure",
    "prepare_model",
    "reshard_model",
    "resolve_device",
    "resolve_parallelism",
    "set_sampler_epoch",
    "shard_dataloader",
    "shard_model",
    "sharded_like",
]
