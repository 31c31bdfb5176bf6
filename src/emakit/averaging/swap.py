"""Swapping the average into a model and back, and the standalone ``ema_model``.

:class:`Swap` puts the evaluated average into a model's tensors (keeping the training weights aside in a
backup) and restores them; while swapped, :meth:`Swap.training_tensors` says where the training weights
are, so updates and checkpoints read them from the backup. It also builds and refreshes ``ema_model``,
a copy of the model's structure whose tensors are the average itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from emakit.averaging.tracked import TrackedModel
from emakit.engine.naming import unwrap_model
from emakit.engine.storage import FlatStorage
from emakit.parallel.teacher import drop_copied_methods, sharded_teacher

__all__ = ["Swap"]


class Swap:
    """Which model holds the EMA weights now (if any), the training weights kept aside, and ``ema_model``."""

    def __init__(self, tracked: TrackedModel) -> None:
        self._tracked = tracked
        #: The model holding the EMA weights and its training weights, between put_in and take_out.
        self.swapped: nn.Module | None = None
        self.backup: FlatStorage | None = None
        self._ema_model: nn.Module | None = None
        #: For a model whose dtype differs from the average's: (model-dtype tensor of ema_model, average view).
        self._ema_model_casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ema_model_version = -1
        #: Depth of ``average_parameters`` blocks now open (no optimizer step belongs inside one).
        self.blocks = 0
        #: The swapped model's trainable parameters' ``_version`` counters just after the swap, by name.
        self._versions: dict[str, int] = {}

    def put_in(self, model: nn.Module, average: FlatStorage) -> nn.Module:
        """Copy ``average`` into ``model``, keeping its training weights in the backup; a no-op if it holds it."""
        if self.swapped is not None:
            if unwrap_model(self.swapped) is unwrap_model(model):
                return model
            raise RuntimeError("the EMA weights are already in another model; call ema.get_training_model on it first")
        targets = self._tracked.live(model)
        self.backup = FlatStorage(dict(zip(self._tracked.names, targets, strict=True)), fp32_ema=False)
        average.copy_to(targets)
        self._tracked.release(model)  # ZeRO-3: the next forward gathers the EMA partitions
        self.swapped = model
        self._versions = {
            name: t._version
            for name, t in zip(self._tracked.names, targets, strict=True)
            if isinstance(t, nn.Parameter) and t.requires_grad
        }
        return model

    @contextlib.contextmanager
    def block(self, model: nn.Module, storage: FlatStorage, wait: Callable[[], None]) -> Iterator[None]:
        """The body of ``with ema.average_parameters():`` (the EMA weights already in ``model``): on leaving,
        also through an exception, the training weights go back; then parameters changed in place inside are
        an error (they were the EMA weights)."""
        self.blocks += 1
        changed: list[str] = []
        try:
            yield
            changed = self.changed_in_place(model, storage)
        finally:
            self.blocks -= 1
            if self.is_swapped_out(model):
                wait()
                self.take_out(model)
        if changed:
            raise RuntimeError(self.changed_message(changed))

    def changed_in_place(self, model: nn.Module, average: FlatStorage) -> list[str]:
        """The trainable parameters of ``model`` (holding ``average``) written in place since the swap.

        A tensor's ``_version`` counter says it was written; a flattened model's views share one counter,
        so a written one is also compared with the average it was given.
        """
        live = dict(zip(self._tracked.names, self._tracked.live(model), strict=True))
        changed = []
        for name, version in self._versions.items():
            tensor = live[name]
            if tensor._version != version:
                with torch.no_grad():
                    if not torch.equal(tensor, average.tensors[name].to(tensor.dtype)):
                        changed.append(name)
        return changed

    def refuse_step(self) -> None:
        """RuntimeError if an ``average_parameters`` block is open: an optimizer step there trains the EMA weights."""
        if self.blocks:
            raise RuntimeError(
                "ema.step() inside `with ema.average_parameters():`, where the model holds the EMA weights: an "
                "optimizer step there changes them, not the training weights, and is lost on leaving the block. "
                "Step the optimizer and the EMA outside the block"
            )

    @staticmethod
    def changed_message(names: list[str]) -> str:
        """The error for trainable parameters changed inside ``average_parameters``."""
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (
            f"{len(names)} parameter(s) ({shown}) were changed in place inside `with ema.average_parameters():`. "
            "Inside the block the model holds the EMA weights, so the changes (an optimizer step?) were made to "
            "them and are not kept: the training weights were restored as they were before the block. "
            "Train outside the block; use it to evaluate"
        )

    def is_swapped_out(self, model: nn.Module) -> bool:
        """Whether ``model`` holds the EMA weights and its training weights are in the backup."""
        return self.swapped is not None and unwrap_model(self.swapped) is unwrap_model(model)

    def take_out(self, model: nn.Module) -> nn.Module:
        """Put the training weights back into ``model``; a no-op if they are already there."""
        if not self.is_swapped_out(model):
            return model
        assert self.backup is not None
        self.backup.copy_to(self._tracked.live(model))
        self._tracked.release(model)  # ZeRO-3: drop copies gathered from the EMA partitions
        self.backup = None
        self.swapped = None
        return model

    def training_tensors(self) -> list[torch.Tensor]:
        """The training weights, wherever they are: in the model, or in the backup while swapped out."""
        if self.backup is not None and self.swapped is not None and self._tracked.is_own(self.swapped):
            return self._tracked.masters(self.backup.views())  # ZeRO-3: masters are never swapped
        return self._tracked.masters(self._tracked.live())

    def training_model_tensors(self) -> dict[str, torch.Tensor]:
        """:meth:`training_tensors` by name, as the model's tensors (DTensors for a sharded model)."""
        return self._tracked.as_model_tensors(dict(zip(self._tracked.names, self.training_tensors(), strict=True)))

    def training_backup(self) -> dict[str, torch.Tensor] | None:
        """The followed model's training weights by name while the EMA's are in it; None otherwise."""
        if self.backup is not None and self.swapped is not None and self._tracked.is_own(self.swapped):
            return dict(zip(self._tracked.names, self.backup.views(), strict=True))
        return None

    def forget_ema_model(self) -> None:
        """Drop ``ema_model`` (built over storages that are gone or no longer evaluated)."""
        self._ema_model = None

    def ema_model(self, average: FlatStorage, version: int) -> nn.Module:
        """``ema_model`` over ``average``; its cast copies refreshed if the average moved since ``version``."""
        if self._ema_model is None:
            self._ema_model = self._build_ema_model(average)
            self._ema_model_version = -1
        if self._ema_model_casts and self._ema_model_version != version:
            with torch.no_grad():
                for target, source in self._ema_model_casts:
                    target.copy_(source)
        self._ema_model_version = version
        return self._ema_model

    def _build_ema_model(self, average: FlatStorage) -> nn.Module:
        tracked = self._tracked
        assert tracked.model is not None
        if tracked.zero3:
            raise RuntimeError(
                "ema_model is not available for a DeepSpeed ZeRO-3 model: each rank holds only its partitions of the "
                "average. Use emakit.export_ema_weights(ema, path) to write the whole EMA to one file, "
                "or `with ema.average_parameters():` to run the partitioned model on the EMA weights"
            )
        module = unwrap_model(tracked.model)
        originals = tracked.model_tensors()  # resharded: the sharded parameters are registered
        views: dict[str, torch.Tensor] = {}
        casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for original, name in zip(originals, tracked.names, strict=True):
            view = average.tensors[name]
            if view.dtype != original.dtype:
                cast = view.detach().to(original.dtype)
                casts.append((cast, view))
                view = cast
            views[name] = view
        self._ema_model_casts = casts
        if tracked.sharded:  # each rank holds its shards of the average: a teacher sharded like the model
            return sharded_teacher(module, views)
        memo: dict[int, Any] = {
            id(o): nn.Parameter(views[name], requires_grad=False) if isinstance(o, nn.Parameter) else views[name]
            for o, name in zip(originals, tracked.names, strict=True)
        }
        for kept in (*module.parameters(), *module.buffers()):  # what the EMA does not keep is shared
            memo.setdefault(id(kept), kept)
        ema_model = copy.deepcopy(module, memo)
        drop_copied_methods(module, ema_model)  # a forward compiled in place would run the training weights
        return ema_model.eval()
