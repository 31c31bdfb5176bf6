"""Splitting data loaders across ranks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch.utils.data import DistributedSampler

__all__ = ["EvalDistributedSampler", "set_sampler_epoch", "shard_dataloader"]


class EvalDistributedSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` for evaluation that knows which samples are padding.

    Every rank must run the same number of forwards (FSDP gathers parameters in each one), so the sampler
    still pads the dataset to a multiple of the world size by repeating samples; padding takes the last
    global positions, so on each rank it is the tail. ``num_real`` is how many of this rank's samples
    come first and are real: metrics that count only those count every sample exactly once.
    """

    def __init__(self, dataset: Any, *, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_real = len(range(rank, len(dataset), num_replicas))


def shard_dataloader(
    loader: Iterable[Any],
    *,
    world_size: int,
    rank: int,
    seed: int | None,
    what: str = "dataloader",
    pad: bool = True,
) -> Iterable[Any]:
    """``loader`` rebuilt with a :class:`~torch.utils.data.DistributedSampler`, so each rank reads its part.

    Rebuilt: a plain DataLoader over a map-style dataset with its default sampler (shuffled loaders get a
    shuffling sampler seeded with ``seed``, 0 if None); batch size, collate_fn, workers, drop_last and
    the rest are kept. Returned as they are: loaders that already use a DistributedSampler, and (with a
    warning, since every rank would read all of it) anything else. The sampler pads the dataset to a
    multiple of ``world_size`` by repeating samples, so every rank runs the same number of batches (for
    training). ``pad=False`` (for evaluation) uses :class:`EvalDistributedSampler`, which marks the
    repeated samples so that evaluation counts every sample exactly once.
    """
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
    )

    if world_size <= 1:
        return loader
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):  # the caller's own split
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
    kind: type[DistributedSampler[Any]] = DistributedSampler if pad else EvalDistributedSampler
    distributed_sampler: DistributedSampler[Any] = kind(
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
