"""The tracked set: which tensors of the model the average holds, and reading them wherever they live now.

:class:`TrackedModel` is the one owner of that fact. It applies the user's selection (``params`` and
``buffers``, :mod:`.selection`) at three events only — :meth:`~TrackedModel.attach` (refusing a choice that names
nothing), :meth:`~TrackedModel.start` (the set is fixed when the average starts) and
:meth:`~TrackedModel.select_saved` (the set a resumed state was started with) — and pairs the chosen tensors by
canonical name, finding them again when a submodule or tensor is registered anew. Every other part of the
averager reads "the tracked tensors" from here, without knowing about wrappers, flattening or FSDP shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from emakit.averaging.selection import Selection, decide
from emakit.engine.flatten import flatten_model_
from emakit.engine.kernels import nonfinite_positions
from emakit.engine.naming import named_tensors, tensor_slots, unwrap_model
from emakit.engine.registry import registration_count
from emakit.parallel.sharding import is_sharded_model, local_tensor, reshard_model, sharded_like
from emakit.parallel.zero import is_zero3_model, master_partition, partition, release_gathered

__all__ = ["TrackedModel"]


class TrackedModel:
    """The followed model, the tracked tensors' canonical names and slots (module table, key), and the buffers
    the selection copies rather than averages."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.model: nn.Module | None = None
        self.names: list[str] = []
        #: The tracked floating buffers under the policy ``'copy'``: set to the model's value after each blend.
        self.copied: list[str] = []
        self._slots: list[tuple[dict, str]] = []
        self._slots_count = -1
        #: The tracked tensors' shapes when they were chosen: a replaced submodule must keep them.
        self._shapes: list[torch.Size] = []
        #: FSDP2-sharded model (DTensor parameters): the storage holds this rank's shards only.
        self.sharded = False
        #: DeepSpeed ZeRO-3 model (also ``sharded``): the tracked tensors are this rank's flat partitions.
        self.zero3 = False

    # ------------------------------------------------------------------ the three events that choose the set
    def attach(self, model: nn.Module, flatten: bool, started: Sequence[str] | None) -> bool:
        """Follow ``model`` (flattened first if asked and not sharded) and track what the selection picks now,
        or the names ``started`` (an average already started keeps its set). Returns whether the set changed."""
        self.model = model
        self.zero3 = is_zero3_model(model)  # ZeRO-3: parallel/zero.py
        self.sharded = self.zero3 or is_sharded_model(model)
        if flatten and not self.sharded:
            flatten_model_(model)
        decision = decide(self.selection, model, at_start=False)  # a choice naming nothing fails here
        self.copied = decision.copied
        return self._select(decision.names if started is None else started, force=True)

    def start(self) -> bool:
        """Fix the set as the selection finds it now, when the average starts; returns whether it changed."""
        assert self.model is not None
        decision = decide(self.selection, self.model, at_start=True)
        self.copied = decision.copied
        return self._select(decision.names)

    def select_saved(self, saved: Mapping[str, Any]) -> list[str] | None:
        """Track the tensors a started state's average ``saved`` holds; returns the former set if that changed it.

        A selection by ``requires_grad`` or by a callable was decided at the state's start, so its parameters
        are the state's own; anything else must be as the selection says (the state reader then names a
        missing or unknown tensor).
        """
        assert self.model is not None
        decision = decide(self.selection, self.model, at_start=False)
        params = named_tensors(self.model, include_buffers=False)
        by_start = self.selection.params == "trainable" or callable(self.selection.params)
        names = [
            n for n in named_tensors(self.model) if (n in saved if by_start and n in params else n in decision.names)
        ]
        self.copied = decision.copied
        former = list(self.names)
        return former if self._select(names) else None

    def reselect(self, names: Sequence[str]) -> None:
        """Track ``names`` again (a resumed state that failed its checks gives the former set back)."""
        self._select(names)

    def _select(self, names: Sequence[str], force: bool = False) -> bool:
        """Track ``names``; returns whether the set changed (``force``: find the slots again even if not)."""
        assert self.model is not None
        changed = list(names) != self.names
        if not (changed or force):
            return False
        self._slots = tensor_slots(self.model, names)
        self.names = list(names)
        self._slots_count = registration_count()
        self._shapes = [table[key].shape for table, key in self._slots]
        return changed

    # ------------------------------------------------------------------ reading the tracked tensors
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

    def nonfinite_baseline(self) -> dict[str, torch.Tensor]:
        """Copies of the model's tensors holding NaN or Inf now (a ``-inf`` mask buffer), by canonical name, for
        every tensor of the model whatever the selection: the guard's reference before the average exists."""
        assert self.model is not None
        # ZeRO-3: the partitions, not the empty placeholders (parallel/zero.py)
        named = {name: partition(local_tensor(t)).detach() for name, t in named_tensors(self.model).items()}
        names, tensors = list(named), list(named.values())
        return {names[i]: tensors[i].clone() for i in nonfinite_positions(tensors)}

    def device(self) -> torch.device:
        """Where the tracked tensors are (the CPU if none is followed): for the averager's collectives."""
        live = self.live() if self.model is not None else []
        return live[0].device if live else torch.device("cpu")

    def as_model_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (this rank's shards) as DTensors sharded like the model's, for sharded checkpoints."""
        if not self.sharded:
            return dict(tensors)
        like = dict(zip(self.names, self.model_tensors(), strict=True))
        return {name: sharded_like(t, like[name]) if name in like else t for name, t in tensors.items()}
