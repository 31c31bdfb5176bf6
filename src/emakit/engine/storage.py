"""Flat storage for a set of named tensors: one contiguous buffer per (device, dtype).

The EMA algorithm keeps its averages here. Each named tensor is a view into its group's buffer, so the
whole EMA can be saved, loaded, copied or blended group by group, and a model whose own tensors share
the same layout (see :mod:`emakit.engine.flatten`) can be blended with one kernel per group.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch

from emakit.engine.kernels import copy_tensors_, nonfinite_positions
from emakit.engine.memory import is_dense
from emakit.engine.naming import is_averaged
from emakit.engine.plan import UpdatePlan

__all__ = ["ALIGN_ELEMENTS", "FlatStorage", "check_state_matches", "packed_offsets", "storage_dtype"]

#: Tensors start at multiples of this many elements, whatever the dtype, so that an fp32 EMA of a bf16 model
#: has the model's element offsets (32 bytes of bf16, 64 of fp32: aligned for vector loads either way).
ALIGN_ELEMENTS = 16


def storage_dtype(dtype: torch.dtype, fp32_ema: bool) -> torch.dtype:
    """The dtype an average of a ``dtype`` tensor is kept in: fp32 for 16-bit floats if ``fp32_ema``."""
    if fp32_ema and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def check_state_matches(
    state: Mapping[str, object], reference: Mapping[str, torch.Tensor], what: str, hint: str = ""
) -> None:
    """Raise ValueError naming the first tensor of ``state`` whose name, shape or kind differs from ``reference``.

    Kinds are floating (averaged) and integer/bool (copied); a float32 state may load into a bfloat16
    reference and the other way round. ``hint`` ends the message of a missing or unknown tensor.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a dict of tensors, got {type(state).__name__}")
    for name in reference:
        if name not in state:
            raise ValueError(f"{what} has no tensor {name!r}, which the model has{hint}")
    for name, value in state.items():
        if name not in reference:
            raise ValueError(f"{what} has a tensor {name!r} that the model does not have{hint}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: {name!r} is a {type(value).__name__}, expected a tensor")
        mine = reference[name]
        if value.shape != mine.shape:
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(value.shape)}, the model's has {tuple(mine.shape)}"
            )
        if is_averaged(value) != is_averaged(mine):
            raise ValueError(f"{what}: tensor {name!r} is {value.dtype}, the model's is {mine.dtype}")


class FlatStorage:
    """Copies of named tensors, each a view into one flat buffer per (device, dtype).

    Within a buffer, tensors are packed in ``names`` order, each starting at a multiple of
    :data:`ALIGN_ELEMENTS` elements, in one segment per source dtype. Sources that are themselves views into
    one buffer (a model flattened by :func:`emakit.engine.flatten.flatten_model_`) are stored with the same
    relative element offsets instead, so that :meth:`blend` updates each segment with one kernel.

    Args:
        sources: the tensors to copy, by name; the order is kept.
        fp32_ema: keep fp16/bf16 floating tensors in fp32.
    """

    def __init__(self, sources: Mapping[str, torch.Tensor], *, fp32_ema: bool = True) -> None:
        self.names: list[str] = list(sources)
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        candidates: dict[tuple[torch.device, torch.dtype, torch.dtype], list[str]] = {}
        for name, src in sources.items():
            dtype = storage_dtype(src.dtype, fp32_ema) if is_averaged(src) else src.dtype
            candidates.setdefault((src.device, dtype, src.dtype), []).append(name)
        # (buffer key, [(name, offset within the segment)], segment length)
        segments: list[tuple[tuple[torch.device, torch.dtype], list[tuple[str, int]], int]] = []
        for (device, dtype, _), names in candidates.items():
            for entries, length in _segments([(n, sources[n]) for n in names]):
                segments.append(((device, dtype), entries, length))
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        placed: list[tuple[tuple[torch.device, torch.dtype], int, list[tuple[str, int]]]] = []
        for key, entries, length in segments:
            start = _align(sizes.get(key, 0))
            placed.append((key, start, entries))
            sizes[key] = start + length
        for key, size in sizes.items():
            self.buffers[key] = torch.zeros(size, dtype=key[1], device=key[0])
        self.tensors: dict[str, torch.Tensor] = {}
        for key, start, entries in placed:
            for name, offset in entries:
                src = sources[name]
                if src.layout == torch.strided and is_dense(src):  # keep channels-last layouts
                    self.tensors[name] = self.buffers[key].as_strided(src.shape, src.stride(), start + offset)
                else:
                    self.tensors[name] = self.buffers[key][start + offset : start + offset + src.numel()].view(
                        src.shape
                    )
        self.tensors = {n: self.tensors[n] for n in self.names}
        self.averaged: list[str] = [n for n in self.names if is_averaged(self.tensors[n])]
        self.copied: list[str] = [n for n in self.names if not is_averaged(self.tensors[n])]
        self._views = [self.tensors[n] for n in self.names]
        self._blended = [is_averaged(t) for t in self._views]
        self._plan: UpdatePlan | None = None
        self._plan_reader: Callable[[], Sequence[torch.Tensor]] | None = None
        self._plan_phases: Sequence[int] | None = None
        #: Stored floating tensors holding NaN or Inf since the last copy_from: where the average can equal a
        #: non-finite source (a -inf mask), so that its blends keep those values (see UpdatePlan's ``keep``).
        self._held: list[int] = []
        self.copy_from([sources[n] for n in self.names])

    @property
    def nbytes(self) -> int:
        """Bytes held by the flat buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def views(self) -> list[torch.Tensor]:
        """The stored tensors in ``names`` order."""
        return list(self._views)

    def _update_plan(
        self, sources: Sequence[torch.Tensor], blended: Sequence[bool], phases: Sequence[int] | None = None
    ) -> UpdatePlan:
        if len(sources) != len(self._views):
            raise ValueError(f"expected {len(self._views)} source tensors (one per name), got {len(sources)}")
        return UpdatePlan(
            self._views, sources, blended, protected=self._views, watch_targets=False, phases=phases, held=self._held
        )

    def current_flat_sources(self) -> list[torch.Tensor] | None:
        """The flat spans of the training weights that the current update plan blends from, if the plan is
        made of flat groups only and still current; None otherwise. Lets whole-model checks read a few
        buffers instead of every tensor."""
        plan = self._plan
        if plan is None or not plan.reusable or not plan.is_current():
            return None
        return [group.source for group in plan.flat if group.averaged]

    def prepare(
        self,
        sources: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]],
        phases: Sequence[int] | None = None,
    ) -> UpdatePlan:
        """The update plan pairing the stored tensors with ``sources``; ``plan.run(weight)`` blends.

        ``sources`` are in ``names`` order, or a callable returning them: then the plan is kept between calls
        with the same callable (and the same ``phases`` object). For a flattened model the callable is not
        even called while the plan is current: the update is one kernel per segment and no per-tensor Python
        work. Otherwise it is called, and its tensors are checked against the plan's instead of being paired
        again. ``phases`` splits the pairs for :meth:`UpdatePlan.run` (see :class:`UpdatePlan`).
        """
        plan = self._plan
        if plan is not None and sources is self._plan_reader and phases is self._plan_phases:
            fresh = sources() if plan.loose else None
            if plan.is_current(fresh):
                return plan
        elif not callable(sources):
            return self._update_plan(sources, self._blended, phases)
        else:
            fresh = None
        self._plan = self._plan_reader = plan = None  # release its spans before the new plan counts references
        plan = self._update_plan(sources() if fresh is None else fresh, self._blended, phases)
        plan.snapshot()
        self._plan, self._plan_reader, self._plan_phases = plan, sources, phases
        return plan

    def blend(self, sources: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]], weight: float) -> None:
        """``stored <- stored + weight * (source - stored)`` for floating tensors; copy the others.

        ``sources`` as for :meth:`prepare`, which keeps the pairing between calls with the same callable. With
        a kept plan, the loose pairs' data is checked chunk by chunk as the plan runs
        (:meth:`UpdatePlan.run_checked`); the pairs after a re-pointed tensor are blended by a plan made for
        them, and the next call pairs everything again.
        """
        plan = self._plan
        if plan is not None and sources is self._plan_reader and self._plan_phases is None and callable(sources):
            fresh = sources() if plan.loose else None
            if plan.is_current(fresh, data=False):
                unrun = plan.run_checked(weight)
                if unrun is None:
                    return
                assert fresh is not None  # only loose pairs are left unrun
                self._plan = self._plan_reader = plan = None
                some = [self._views[i] for i in unrun], [fresh[i] for i in unrun], [self._blended[i] for i in unrun]
                UpdatePlan(*some, protected=self._views, watch_targets=False).run(weight)
                return
        del plan  # the new plan counts references to the buffers: this one's spans must be gone by then
        self.prepare(sources).run(weight)

    @torch.no_grad()
    def copy_from(self, sources: Sequence[torch.Tensor]) -> None:
        """Overwrite the stored tensors with ``sources`` (in ``names`` order)."""
        if len(sources) != len(self._views):
            raise ValueError(f"expected {len(self._views)} source tensors (one per name), got {len(sources)}")
        UpdatePlan(self._views, sources, [False] * len(self._views), protected=self._views, watch_targets=False).run(
            1.0
        )
        held = nonfinite_positions(self._views, self._blended)
        if held != self._held:
            self._held = held
            self._plan = self._plan_reader = None  # made for the other positions

    @torch.no_grad()
    def copy_to(self, targets: Sequence[torch.Tensor]) -> None:
        """Write the stored tensors into ``targets`` (in ``names`` order), casting as needed."""
        copy_tensors_(targets, self._views)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (views; clone them to keep a snapshot)."""
        return dict(self.tensors)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], what: str = "EMA state") -> None:
        """Copy ``state`` into the storage after checking names, shapes and kinds of dtype."""
        check_state_matches(state, self.tensors, what)
        self.copy_from([state[n] for n in self.names])


def _align(offset: int) -> int:
    return -(-offset // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


def packed_offsets(numels: Sequence[int]) -> tuple[list[int], int]:
    """Element offsets placing tensors of ``numels`` elements in order, each at a multiple of ALIGN_ELEMENTS.

    Returns the offsets and the total length. :class:`FlatStorage` and :func:`emakit.engine.flatten.flatten_model_`
    both use it, so a model flattened after its EMA storage was built still shares the storage's layout.
    """
    offsets, end = [], 0
    for n in numels:
        start = _align(end)
        offsets.append(start)
        end = start + n
    return offsets, end


def _segments(items: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[list[tuple[str, int]], int]]:
    """Split same-kind sources into segments: one per source buffer they share (mirrored), one packed."""
    by_buffer: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, src in items:
        if src.numel() > 0 and src.layout == torch.strided and src.device.type != "meta" and is_dense(src):
            by_buffer.setdefault(src.untyped_storage().data_ptr(), []).append((name, src))
    out: list[tuple[list[tuple[str, int]], int]] = []
    mirrored: set[str] = set()
    for group in by_buffer.values():
        mirror = _mirror(group) if len(group) > 1 else None
        if mirror is not None:
            out.append(mirror)
            mirrored.update(name for name, _ in group)
    rest = [(name, src) for name, src in items if name not in mirrored]
    if rest:
        offsets, length = packed_offsets([src.numel() for _, src in rest])
        out.append(([(name, off) for (name, _), off in zip(rest, offsets, strict=True)], length))
    return out


def _mirror(group: Sequence[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, int]], int] | None:
    """Offsets copying the sources' own layout within their buffer, if it is compact and non-overlapping."""
    spans = sorted((int(src.storage_offset()), int(src.storage_offset()) + src.numel(), name) for name, src in group)
    if any(start < end for (_, end, _), (start, _, _) in itertools.pairwise(spans)):
        return None
    low, high = spans[0][0], spans[-1][1]
    _, packed = packed_offsets([src.numel() for _, src in group])
    if high - low > packed + packed // 8 + ALIGN_ELEMENTS:  # mostly foreign tensors in between: pack instead
        return None
    return [(name, start - low) for start, _, name in spans], high - low
