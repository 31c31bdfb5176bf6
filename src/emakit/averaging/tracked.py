"""Which tensors of the model the EMA follows, and reading them wherever they live now.

:class:`TrackedModel` pairs the selected tensors (:mod:`.selection`) by canonical name, and
finds them again when a submodule or tensor is registered anew (re-pairing), so that every other part of
the EMA reads "the tracked tensors" without knowing about wrappers, flattening or FSDP shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from emakit.engine.flatten import flatten_model_
from emakit.engine.naming import named_tensors, tensor_slots, unwrap_model
from emakit.engine.registry import registration_count
from emakit.parallel.sharding import is_sharded_model, local_tensor, reshard_model, sharded_like
from emakit.parallel.zero import is_zero3_model, master_partition, partition, release_gathered

__all__ = ["TrackedModel"]


class TrackedModel:
    """The followed model and the slots (module table, key) of its tracked tensors, by canonical name."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.names: list[str] = []
        self._slots: list[tuple[dict, str]] = []
        self._slots_count = -1
        #: The tracked tensors' shapes at attach: a replaced submodule must keep them.
        self._shapes: list[torch.Size] = []
        #: FSDP2-sharded model (DTensor parameters): the storage holds this rank's shards only.
        self.sharded = False
        #: DeepSpeed ZeRO-3 model (also ``sharded``): the tracked tensors are this rank's flat partitions.
        self.zero3 = False

    def attach(self, model: nn.Module, flatten: bool) -> dict[str, torch.Tensor]:
        """Follow ``model`` (flattened first if asked and not sharded); returns its parameters by name."""
        self.model = model
        params = named_tensors(model, include_buffers=False)
        self.names = [n for n in named_tensors(model) if n not in params or params[n].requires_grad]
        self._slots = tensor_slots(model, self.names)
        self._slots_count = registration_count()
        self._shapes = [table[key].shape for table, key in self._slots]
        self.zero3 = is_zero3_model(model)  # ZeRO-3: parallel/zero.py
        self.sharded = self.zero3 or is_sharded_model(model)
        if flatten and not self.sharded:
            flatten_model_(model)
        return params

    def select(self, names: Sequence[str]) -> bool:
        """Track ``names`` (canonical) from now on instead of the set chosen before; returns whether it changed."""
        assert self.model is not None
        if list(names) == self.names:
            return False
        self._slots = tensor_slots(self.model, names)
        self.names = list(names)
        self._slots_count = registration_count()
        self._shapes = [table[key].shape for table, key in self._slots]
        return True

    def is_own(self, model: nn.Module) -> bool:
        """Whether ``model`` is the followed model (wrappers aside)."""
        return self.model is not None and unwrap_model(model) is unwrap_model(self.model)

    def model_tensors(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """The tracked tensors as the model holds them: DTensors for sharded parameters (after resharding)."""
        model = self.model if model is None else model
        assert model is not None
        reshard_model(model)
        slots = self._slots if model is self.model else tensor_slots(model, self.names)
        if self.zero3:  # ZeRO-3: the partitions are the tensors the model keeps (parallel/zero.py)
            return [partition(table[key]) for table, key in slots]
        return [table[key] for table, key in slots]

    def masters(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """ZeRO-3: ``tensors`` (the tracked tensors, training weights) with the optimizer's fp32 master partition
        in place of each parameter partition that has one, as the source of the average (parallel/zero.py)."""
        if not self.zero3:
            return tensors
        masters = [master_partition(table[key]) for table, key in self._slots]
        return [t if m is None else m for t, m in zip(tensors, masters, strict=True)]

    def release(self, model: nn.Module | None = None) -> None:
        """ZeRO-3: free gathered copies of parameters after their partitions were written (parallel/zero.py)."""
        target = self.model if model is None else model
        if self.zero3 and target is not None:
            release_gathered(target)

    def live(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """The tracked tensors to read and write in place: this rank's shards for a sharded model."""
        if self.sharded:
            return [local_tensor(t) for t in self.model_tensors(model)]
        if model is None or model is self.model:
            count = registration_count()
            if count != self._slots_count:  # a submodule or tensor was registered anew: find the tables again
                assert self.model is not None
                self._slots = tensor_slots(self.model, self.names)
                self._slots_count = count
                self._check_shapes()
            return [table[key] for table, key in self._slots]
        return [table[key] for table, key in tensor_slots(model, self.names)]

    def _check_shapes(self) -> None:
        for name, (table, key), shape in zip(self.names, self._slots, self._shapes, strict=True):
            if table[key].shape != shape:
                raise RuntimeError(
                    f"tracked tensor {name!r} now has shape {tuple(table[key].shape)}, {tuple(shape)} when the EMA "
                    "attached: a submodule or tensor was replaced by one of another shape, which the average cannot "
                    "follow. Replace submodules before ema.attach(model), or attach a new EMA to the changed model"
                )

    def device(self) -> torch.device:
        """Where the tracked tensors are (the CPU if none is followed): for the EMA's collectives."""
        live = self.live() if self.model is not None else []
        return live[0].device if live else torch.device("cpu")

    def as_model_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (this rank's shards) as DTensors sharded like the model's, for sharded checkpoints."""
        if not self.sharded:
            return dict(tensors)
        like = dict(zip(self.names, self.model_tensors(), strict=True))
        return {name: sharded_like(t, like[name]) if name in like else t for name, t in tensors.items()}
