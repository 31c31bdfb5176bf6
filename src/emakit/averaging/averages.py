"""The averages themselves: one :class:`~emakit.engine.storage.FlatStorage` per tracked average, and their update.

:class:`Averages` starts them as copies of the weights and blends the weights into them: one average
directly, one average overlapped with the next training step (``overlap=True``), or several averages from
one read of the weights through a blend prepared once per update plan (:class:`PreparedBlend`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

import torch
from torch import nn

from emakit.averaging import replicated
from emakit.averaging.tracked import TrackedModel
from emakit.engine.blend import PreparedBlend, blend_averages_
from emakit.engine.kernels import Held, hold_equal, nonfinite_positions, restore_equal
from emakit.engine.naming import is_averaged, named_tensors
from emakit.engine.overlap import Overlap, make_overlap
from emakit.engine.plan import UpdatePlan
from emakit.engine.storage import FlatStorage

__all__ = ["ALONGSIDE", "NOW", "Averages", "Source"]

#: Update phases with ``overlap=True``: buffers (and copied tensors) at once, floating parameters alongside the
#: next step. BatchNorm's forward and DDP's broadcast write buffers; only the optimizer step writes parameters.
NOW, ALONGSIDE = 0, 1

#: The training weights to blend: a reader (whose update plan the storage keeps while it is passed) or a list.
Source: TypeAlias = Callable[[], list[torch.Tensor]] | list[torch.Tensor]


def _written_in_forward(model: nn.Module) -> set[int]:
    """Ids of the parameters that their module's forward writes in place: an overlapped update blends them at
    once, like buffers. (``Embedding``/``EmbeddingBag`` with ``max_norm`` renormalise the rows they look up.)
    By identity, not by name: a weight tied to a module registered earlier is tracked under that module's name."""
    return {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None
    }


class Averages:
    """The storages of ``num_averages`` averages (None before the start), laid out alike, and how they update."""

    def __init__(self, num_averages: int) -> None:
        self.num_averages = num_averages
        #: One storage per tracked average (None before the start).
        self.storages: list[FlatStorage] | None = None
        #: Several averages: the first storage's update plan and the blend prepared for it, rebuilt when the
        #: plan is; dropped whenever the model or the storages change.
        self.prepared: tuple[UpdatePlan, PreparedBlend] | None = None
        self.overlap: Overlap | None = None
        self._overlap_device: torch.device | None = None
        #: Per tracked tensor, when it is blended with ``overlap`` (NOW or ALONGSIDE); a tuple kept as one
        #: object, so that the storage keeps its update plan between updates.
        self._phases: tuple[int, ...] | None = None

    def wait(self) -> None:
        """Finish the pending overlapped update; a no-op without one."""
        if self.overlap is not None:
            self.overlap.wait()

    def setup_overlap(self, model: nn.Module, names: Sequence[str], tensors: list[torch.Tensor]) -> None:
        """Decide each tracked tensor's phase and make the overlap for the device of the parameters."""
        params = named_tensors(model, include_buffers=False)
        written = _written_in_forward(model)
        self._phases = tuple(
            ALONGSIDE if name in params and id(params[name]) not in written and is_averaged(t) else NOW
            for name, t in zip(names, tensors, strict=True)
        )
        devices = sorted({str(t.device) for t, p in zip(tensors, self._phases, strict=True) if p == ALONGSIDE})
        if len(devices) > 1:
            raise ValueError(
                f"overlap=True needs the model's trainable parameters on one device, found {', '.join(devices)}"
            )
        device = torch.device(devices[0]) if devices else None
        if device != self._overlap_device:
            self.overlap = make_overlap(device) if device is not None else None
            self._overlap_device = device

    def create(self, sources: Mapping[str, torch.Tensor], fp32_ema: bool) -> None:
        """New storages shaped like ``sources`` (and holding their values)."""
        self.storages = [FlatStorage(dict(sources), fp32_ema=fp32_ema) for _ in range(self.num_averages)]
        self.prepared = None

    def start(self, sources: Mapping[str, torch.Tensor], fp32_ema: bool) -> bool:
        """Every average set to a copy of ``sources``; returns whether new storages had to be made."""
        if self.storages is None:
            self.create(sources, fp32_ema)
            return True
        for storage in self.storages:
            storage.copy_from(list(sources.values()))
        return False

    def load(self, averages: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Set the averages to saved ones (checked against the model beforehand)."""
        assert self.storages is not None
        for storage, average in zip(self.storages, averages, strict=True):
            storage.load_state_dict(average)

    def restore(
        self, averages: Sequence[Mapping[str, torch.Tensor]] | None, live: Mapping[str, torch.Tensor], fp32_ema: bool
    ) -> bool:
        """Set the averages to a resumed state's (None: from before the start); returns whether the storages
        were made or dropped (so that an ``ema_model`` built on the former ones is forgotten)."""
        if averages is None:
            self.drop()
            return True
        made = self.storages is None
        if made:
            self.create(live, fp32_ema)
        self.load(averages)
        return made

    def as_model_tensors(self, tracked: TrackedModel) -> list[dict[str, torch.Tensor]]:
        """Every average by name as written: the model's tensors (DTensors for a sharded model), once started.

        A collective under FSDP2 with replicated buffers (:func:`.replicated.written`): call it on every rank.
        """
        assert self.storages is not None
        return replicated.written(tracked, [s.state_dict() for s in self.storages])

    def drop(self) -> None:
        """Forget the averages (a resumed state from before the start)."""
        self.storages = None
        self.prepared = None

    def blend(self, source: Source, weights: list[float]) -> None:
        """Blend the training weights into every average, ``weights[j]`` being average ``j``'s ``1 - beta``."""
        assert self.storages is not None
        if len(self.storages) > 1:
            self._blend_all(source, weights)
        elif self.overlap is None:
            self.storages[0].blend(source, weights[0])
        else:
            plan = self.storages[0].prepare(source, self._phases)
            plan.run(weights[0], NOW)
            self.overlap.launch(plan.bound(weights[0], ALONGSIDE))

    @torch.no_grad()
    def copy_buffers(
        self, names: Sequence[str], copied: Sequence[str], sources: Callable[[], list[torch.Tensor]]
    ) -> None:
        """After a blend, set the buffers of policy ``'copy'`` (``copied``) of every average to the model's values
        (``sources()``, one per tracked name of ``names``): the blend treats all floating tensors alike."""
        if not copied or self.storages is None:
            return
        index = {name: i for i, name in enumerate(names)}
        tensors = sources()
        for storage in self.storages:
            for name in copied:
                if name in index and name in storage.tensors:  # a state saved with another selection may keep fewer
                    storage.tensors[name].copy_(tensors[index[name]])

    def _blend_all(self, source: Source, weights: list[float]) -> None:
        """Every average from one read of the training weights.

        The storages share one layout, so the first storage's update plan also pairs the others. While that
        plan stays current, the blend runs over lists prepared once for it (:class:`PreparedBlend`): over
        the plan's few flat spans for a flattened model, over every tensor otherwise.
        """
        assert self.storages is not None
        if callable(source):
            plan = self.storages[0].prepare(source)
            if plan.reusable or plan.sources is not None:
                if self.prepared is None or self.prepared[0] is not plan:
                    self.prepared = None  # its views of the weights must be gone before the count
                    self.prepared = (plan, self._prepared_blend(plan))
                    plan.snapshot()  # the prepared chunks are views of the weights' buffers: count them as current
                pairs = [(i, s) for i, (_, _, s) in zip(plan.held_index, plan.held_equal, strict=True)]
                held = self._hold_equal(pairs)
                self.prepared[1](weights)
                restore_equal(held)
                return
            source = source()
        held = self._hold_equal([(i, source[i]) for i in nonfinite_positions(source)])
        blend_averages_([storage.views() for storage in self.storages], source, weights)
        restore_equal(held)

    def _hold_equal(self, pairs: list[tuple[int, torch.Tensor]]) -> Held:
        """Every average's values equal to the (non-finite) source at positions ``pairs``, to set back after
        the blend (see :func:`~emakit.engine.kernels.hold_equal`)."""
        assert self.storages is not None
        if not pairs:
            return []
        views = [storage.views() for storage in self.storages]
        return hold_equal([v[i] for v in views for i, _ in pairs], [s for _ in views for _, s in pairs])

    def _prepared_blend(self, plan: UpdatePlan) -> PreparedBlend:
        """The blend of every storage with ``plan``'s sources (``plan`` pairs the first storage)."""
        assert self.storages is not None
        offsets = [t.storage_offset() for t in self.storages[0].views()]
        for storage in self.storages[1:]:
            if [t.storage_offset() for t in storage.views()] != offsets:
                raise RuntimeError("the tracked averages' storages are not laid out alike")  # never expected
        if plan.sources is not None:
            return PreparedBlend([storage.views() for storage in self.storages], plan.sources)
        averages = [
            [
                storage.buffers[(g.target.device, g.target.dtype)].as_strided(
                    g.target.shape, (1,), g.target.storage_offset()
                )
                for g in plan.flat
            ]
            for storage in self.storages
        ]
        return PreparedBlend(averages, [g.source for g in plan.flat])
