"""The functional core: EMA arithmetic over tensors paired by name.

Nothing here knows about trainers, events or checkpoints. The update for a floating tensor is

    ema <- smoothing * ema + (1 - smoothing) * model  ==  ema.lerp_(model, 1 - smoothing)

and integer or bool tensors (BatchNorm's ``num_batches_tracked``, step counters) are copied, because an
average of counters truncated back to an integer is meaningless.

Tensors are paired by *canonical name*: the name with the wrappers' prefixes removed (``module.`` from
DistributedDataParallel/DataParallel, ``_orig_mod.`` from ``torch.compile``, and the internal path
components of FSDP1 and activation-checkpoint wrappers), so a wrapped model and a plain copy pair up.
Updates are grouped by (device, dtype) and run as multi-tensor (``torch._foreach_*``) kernels; where both
sides are views into one flat buffer each (see :mod:`emakit.flatten`), a whole group is one kernel
(:class:`UpdatePlan`). Pairing is done once: :func:`compute_ema` keeps it per pair of models and, on each
later call, checks that neither model changed (far more cheaply than pairing again) before running it.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "UpdatePlan",
    "canonical_name",
    "compute_ema",
    "copy_tensors_",
    "is_averaged",
    "lerp_flat_",
    "lerp_tensors_",
    "named_tensors",
    "registration_count",
    "tensor_slots",
    "unwrap_model",
    "validate_smoothing",
]

_LEADING_WRAPPERS = ("module.", "_orig_mod.")
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """Return ``name`` without the prefixes that DDP, DataParallel, torch.compile and FSDP1 add."""
    if "mod" not in name:  # every wrapper's path component contains it; most names are left as they are
        return name
    for inner in _INNER_WRAPPERS:
        name = name.replace(inner, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_WRAPPERS:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = (
            getattr(model, "module", None)
            if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
            else None
        )
        if inner is None and type(model).__name__ == "OptimizedModule":
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


Slot = tuple[dict, str]


def tensor_slots(model: nn.Module, names: Sequence[str]) -> list[Slot]:
    """Where each named tensor of ``model`` lives: ``(module._parameters or module._buffers, key)``.

    Reading ``slot[0][slot[1]]`` at use time sees tensors that were replaced since (``model.to()`` replaces
    buffers), at the cost of one dict lookup per tensor instead of a walk over all modules.
    """
    index: dict[str, Slot] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None:
                    continue
                name = canonical_name(f"{module_name}.{key}" if module_name else key)
                index.setdefault(name, (table, key))
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"model has no tensor named {missing[0]!r}")
    return [index[n] for n in names]


def named_tensors(
    model: nn.Module, *, trainable_only: bool = False, include_buffers: bool = True
) -> dict[str, torch.Tensor]:
    """Parameters (optionally only trainable ones) and buffers of ``model`` under canonical names.

    Tied parameters appear once. Two tensors whose names collide after canonicalisation raise ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    pairs: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only
    ]
    if include_buffers:
        pairs.extend(model.named_buffers())
    for raw, tensor in pairs:
        name = canonical_name(raw)
        if name in out:
            raise ValueError(f"model has two tensors named {name!r} once wrapper prefixes are removed (one is {raw!r})")
        out[name] = tensor
    return out


def is_averaged(tensor: torch.Tensor) -> bool:
    """Whether a tensor is averaged (floating or complex) rather than copied (integer, bool)."""
    return tensor.is_floating_point() or tensor.is_complex()


def validate_smoothing(smoothing: object, name: str = "smoothing") -> float:
    """Return ``smoothing`` as a float after checking it is a real number in [0, 1]."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
    value = float(smoothing)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be a real number in [0, 1], got {smoothing!r}")
    return value


def _group_key(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.device, torch.dtype, torch.device, torch.dtype]:
    return (a.device, a.dtype, b.device, b.dtype)


def _grouped(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    groups: dict[tuple[torch.device, torch.dtype, torch.device, torch.dtype], tuple[list, list]] = {}
    for t, s in zip(targets, sources, strict=True):
        dst, src = groups.setdefault(_group_key(t, s), ([], []))
        dst.append(t)
        src.append(s)
    return groups.values()


@torch.no_grad()
def lerp_tensors_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight: float) -> None:
    """In place, ``t <- t + weight * (s - t)`` for floating tensor pairs, grouped by (device, dtype).

    ``weight`` is ``1 - smoothing``. Pairs may differ in dtype (an fp32 EMA of a bf16 model) or device.
    """
    if weight == 0.0 or not targets:
        return
    if weight == 1.0:
        copy_tensors_(targets, sources)
        return
    for dst, src in _grouped(targets, sources):
        if dst[0].dtype == src[0].dtype and dst[0].device == src[0].device:
            torch._foreach_lerp_(dst, src, weight)
        else:
            _lerp_cast_(dst, src, weight)


def _lerp_cast_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight: float) -> None:
    """``lerp_`` for sources of another dtype or device: cast batches of sources into a cache-sized scratch.

    ``lerp`` needs equal dtypes; ``mul_`` + ``add_`` would read and write the EMA twice (and on CPU take a
    slow mixed-dtype loop), and a full cast would allocate a copy of the model.
    """
    chunk = _chunk_elements(targets[0].device)
    scratch = torch.empty(chunk, dtype=targets[0].dtype, device=targets[0].device)
    batch_t: list[torch.Tensor] = []
    batch_s: list[torch.Tensor] = []
    used = 0
    for t, s in zip(targets, sources, strict=True):
        n = t.numel()
        if n > chunk:
            if t.is_contiguous() and s.is_contiguous():
                lerp_flat_(t.view(-1), s.reshape(-1), weight)
            else:
                t.lerp_(s.to(device=t.device, dtype=t.dtype), weight)
            continue
        if used + n > chunk:
            _lerp_batch_(batch_t, batch_s, scratch, weight)
            batch_t, batch_s, used = [], [], 0
        batch_t.append(t)
        batch_s.append(s)
        used += n
    if batch_t:
        _lerp_batch_(batch_t, batch_s, scratch, weight)


def _lerp_batch_(
    targets: list[torch.Tensor], sources: list[torch.Tensor], scratch: torch.Tensor, weight: float
) -> None:
    views, offset = [], 0
    for s in sources:
        views.append(scratch[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    torch._foreach_copy_(views, sources)
    torch._foreach_lerp_(targets, views, weight)


@torch.no_grad()
def copy_tensors_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """In place, ``t <- s`` for every pair, grouped so that each group is one multi-tensor copy."""
    for dst, src in _grouped(targets, sources):
        torch._foreach_copy_(dst, src)


# ------------------------------------------------------------------ the fast path
#
# An EMA update is pure memory traffic, so its cost is set by the number of kernels and Python calls per
# update. ``UpdatePlan`` pairs targets with sources once, and wherever both sides are views into one buffer
# each, at the same relative element offsets (a model flattened by ``emakit.flatten.flatten_model_`` and a
# ``FlatStorage`` built from it), the update of the whole group is one kernel over the covering spans.

_PLAIN_TYPES: tuple[type, ...] = (torch.Tensor, nn.Parameter, *((nn.Buffer,) if hasattr(nn, "Buffer") else ()))
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
_DATA_PTR = torch.Tensor.data_ptr
_registrations = 0
_watching = False


def _counter(table: str) -> Callable[[nn.Module, str, object], None]:
    def count(module: nn.Module, name: str, value: object) -> None:
        # ``self.step += 1`` on a buffer re-registers the same tensor: nothing moved.
        if module.__dict__.get(table, {}).get(name) is not value:
            global _registrations
            _registrations += 1

    return count


def registration_count() -> int:
    """How many parameters, buffers and submodules any module has registered or replaced so far.

    The first call installs torch's global registration hooks (a dict lookup and a counter increment per
    registration), so cached update plans notice ``module.weight = nn.Parameter(...)``,
    ``load_state_dict(assign=True)`` or a replaced submodule anywhere and re-pair their tensors.
    Re-registering the same object (``self.counter += 1`` on a buffer) does not count.
    """
    global _watching
    if not _watching:
        from torch.nn.modules import module as module_mod

        module_mod.register_module_parameter_registration_hook(_counter("_parameters"))
        module_mod.register_module_buffer_registration_hook(_counter("_buffers"))
        module_mod.register_module_module_registration_hook(_counter("_modules"))
        _watching = True
    return _registrations


def _chunk_elements(device: torch.device) -> int:
    # Scratch for casting a source chunk: small enough to stay in cache (1 MiB of fp32 on CPU: 1.2x the time
    # of an fp32 lerp_ over the same elements, where mul_ + add_ or a full cast take 5-6x; 16 MiB on GPUs,
    # within an H100's L2), large enough that the per-chunk overhead is a few percent.
    return 1 << 22 if device.type == "cuda" else 1 << 18


@torch.no_grad()
def lerp_flat_(target: torch.Tensor, source: torch.Tensor, weight: float) -> None:
    """``target <- target + weight * (source - target)`` for two 1-D tensors of the same length.

    Equal dtypes and devices take one ``lerp_`` kernel. Otherwise (an fp32 EMA of a bf16 model, an EMA kept
    on another device) the source is cast chunk by chunk into a scratch buffer small enough to stay in
    cache and blended from there: one pass over each buffer, no full-size temporary, and none of the slow
    mixed-dtype elementwise loop that ``mul_`` + ``add_`` takes on CPU.
    """
    if target.dtype == source.dtype and target.device == source.device:
        target.lerp_(source, weight)
    else:
        _lerp_cast_flat(target, source, weight)


def _lerp_cast_flat(target: torch.Tensor, source: torch.Tensor, weight: float) -> None:
    numel = target.numel()
    chunk = _chunk_elements(target.device)
    scratch = torch.empty(min(chunk, numel), dtype=target.dtype, device=target.device)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        part = scratch[: stop - start]
        part.copy_(source[start:stop])
        target[start:stop].lerp_(part, weight)


def _is_plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in _PLAIN_TYPES and tensor.layout == torch.strided


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` fills exactly ``numel`` consecutive elements (contiguous or channels-last)."""
    return (
        tensor.is_contiguous()
        or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))
        or (tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d))
    )


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _storage_id(tensor: torch.Tensor) -> int:
    """The address of the tensor's StorageImpl: valid while some tensor keeps that storage alive."""
    return int(tensor.untyped_storage()._cdata)


class _FlatGroup:
    """One kernel's worth of pairs: ``target`` and ``source`` are 1-D spans of one buffer each (detached)."""

    __slots__ = ("averaged", "phase", "same", "source", "target")

    def __init__(self, averaged: bool, phase: int, target: torch.Tensor, source: torch.Tensor) -> None:
        self.averaged = averaged
        self.phase = phase
        self.target = target
        self.source = source
        self.same = target.dtype == source.dtype and target.device == source.device


def _span(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], protected: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The covering 1-D spans if ``targets`` and ``sources`` lie in one buffer each, laid out alike."""
    first_t, first_s = targets[0], sources[0]
    t_store, s_store = _storage_key(first_t), _storage_key(first_s)
    shift = first_s.storage_offset() - first_t.storage_offset()
    intervals = []
    for t, s in zip(targets, sources, strict=True):
        if not (t.shape == s.shape and t.stride() == s.stride() and _is_dense(t)):
            return None
        if s.storage_offset() - t.storage_offset() != shift:
            return None
        if _storage_key(t) != t_store or _storage_key(s) != s_store:
            return None
        intervals.append((t.storage_offset(), t.storage_offset() + t.numel()))
    intervals.sort()
    for (_, end), (start, _) in itertools.pairwise(intervals):
        if start < end:  # overlapping targets: not one span
            return None
    lo, hi = intervals[0][0], intervals[-1][1]
    members = {id(t) for t in targets}
    for other in protected:
        if id(other) in members or other.numel() == 0 or _storage_key(other) != t_store:
            continue
        start = other.storage_offset()
        if start < hi and lo < start + other.numel():  # the span would write into a tensor not in the group
            return None
    try:
        target = first_t.detach().as_strided((hi - lo,), (1,), lo)
        source = first_s.detach().as_strided((hi - lo,), (1,), lo + shift)
    except RuntimeError:  # out of the storage's bounds
        return None
    return target, source


def _maybe_one_buffer(tensors: Sequence[torch.Tensor]) -> bool:
    """Cheap guess, never relied on for correctness: do these tensors share storages at all?"""
    if len(tensors) < 3:
        return True
    probe = (tensors[0], tensors[len(tensors) // 2], tensors[-1])
    return len({_storage_key(t) for t in probe}) < 3


class UpdatePlan:
    """(target, source) tensor pairs prepared for repeated in-place updates.

    Pairs are grouped by kind (averaged or copied), device and dtype. Within a group, pairs whose targets
    lie in one buffer and whose sources lie in one buffer at the same relative element offsets form a
    *flat group*, updated by one kernel over the two covering spans; the padding between tensors is updated
    too, after checking that no tensor of ``protected`` (the other tensors that may share the targets'
    buffers) lives there. The remaining *loose* pairs keep their grouped lists, one multi-tensor kernel per
    group, built once.

    A plan is reused while :meth:`is_current`: no module anywhere registered a parameter, buffer or
    submodule since (see :func:`registration_count`), torch's ``overwrite_module_params_on_conversion`` is
    off, and

    - for flat groups, the reference count of every buffer they read is unchanged (it drops when a tensor is
      re-pointed away from the buffer: ``param.data = ...``, ``model.to(other dtype or device)``,
      ``torch.utils.swap_tensors``) and their data has not moved (a storage resized in place). A plan made
      only of flat groups keeps no per-tensor references, so that those counts can drop.
    - for loose pairs, the freshly read tensors are the plan's objects (a replaced buffer or parameter is a
      new object) and their data still starts where it did (``param.data = ...``, ``model.to(...)`` and
      ``swap_tensors`` keep the object but move its data): one identity check and one data pointer per
      tensor, instead of pairing and grouping them again. :meth:`run_checked` reads the data pointers chunk
      by chunk just before each chunk's kernel, which then finds the tensors' metadata still in cache.

    A stale plan is never used: the caller pairs the tensors again (only those not yet run, when a chunk
    finds a tensor moved).

    Args:
        targets: the tensors written, paired with ``sources`` position by position; zero-size pairs are skipped.
        sources: the tensors read, one per target.
        averaged: per pair, blend (True) or copy (False).
        protected: tensors that a flat group must not write into unless they are its own targets.
        watch_targets: also watch the targets (False when the caller owns them).
        phases: per pair, a small integer; pairs of different phases never share a kernel, so that
            ``run(weight, phase)`` can update them at different moments (an overlapped EMA updates the
            parameters later than the buffers). Default: all in phase 0.
    """

    def __init__(
        self,
        targets: Sequence[torch.Tensor],
        sources: Sequence[torch.Tensor],
        averaged: Sequence[bool],
        *,
        protected: Sequence[torch.Tensor] = (),
        watch_targets: bool = True,
        phases: Sequence[int] | None = None,
    ) -> None:
        self.registrations = registration_count()
        self.flat: list[_FlatGroup] = []
        self.loose: list[tuple[bool, int, list[torch.Tensor], list[torch.Tensor]]] = []
        if phases is None:
            phases = [0] * len(targets)
        groups: dict[tuple[bool, int, bool, tuple[object, ...]], list[int]] = {}
        for i, (t, s, avg, phase) in enumerate(zip(targets, sources, averaged, phases, strict=True)):
            if t.numel() > 0:
                groups.setdefault((avg, phase, _is_plain(t) and _is_plain(s), _group_key(t, s)), []).append(i)
        leftovers: dict[tuple[bool, int, bool, tuple[object, ...]], list[int]] = {}
        singles: list[tuple[tuple[bool, int, bool, tuple[object, ...]], int, _FlatGroup]] = []
        for group_key, index in groups.items():
            avg, phase, plain, _ = group_key
            leftover: list[int] = index
            if (
                plain
                and _maybe_one_buffer([targets[i] for i in index])
                and _maybe_one_buffer([sources[i] for i in index])
            ):
                buffers: dict[tuple[int, int], list[int]] = {}
                for i in index:
                    buffers.setdefault((_storage_key(targets[i]), _storage_key(sources[i])), []).append(i)
                if len(buffers) <= max(4, len(index) // 8):
                    leftover = []
                    for members in buffers.values():
                        span = _span([targets[i] for i in members], [sources[i] for i in members], protected)
                        if span is None:
                            leftover += members
                        else:
                            self.flat.append(_FlatGroup(avg, phase, *span))
                            if len(members) == 1:
                                singles.append((group_key, members[0], self.flat[-1]))
            if leftover:
                leftovers[group_key] = leftover
        if leftovers and singles:
            # The plan reads every tensor anyway: a lone pair costs less as a loose one than as a watched span.
            demoted = {id(group) for _, _, group in singles}
            self.flat = [group for group in self.flat if id(group) not in demoted]
            for group_key, i, _ in singles:
                leftovers.setdefault(group_key, []).append(i)
        loose_index: list[list[int]] = []
        for (avg, phase, _, _), leftover in leftovers.items():
            self.loose.append((avg, phase, [targets[i] for i in leftover], [sources[i] for i in leftover]))
            loose_index.append(leftover)
        # Loose pairs are checked against freshly read tensors (see is_current): all of them, in the order given.
        self._sources: list[torch.Tensor] | None = None
        self._targets: list[torch.Tensor] | None = None
        self._empty: list[torch.Tensor] = []  # zero-size pairs: never run, but their data must not have moved
        self._empty_ptrs: list[int] | None = []
        self._chunks: list[_Chunk] = []
        if self.loose:
            self._sources = list(sources)
            self._targets = list(targets) if watch_targets else None
            for t, s in zip(targets, sources, strict=True):
                if t.numel() == 0:
                    self._empty += [t, s] if watch_targets else [s]
            self._empty_ptrs = _data_ptrs(self._empty)
            for (avg, _, dst, src), index in zip(self.loose, loose_index, strict=True):
                same = dst[0].dtype == src[0].dtype and dst[0].device == src[0].device
                for start in range(0, len(dst), _CHUNK_PAIRS):
                    part = slice(start, start + _CHUNK_PAIRS)
                    moved = [*dst[part], *src[part]] if watch_targets else src[part]
                    self._chunks.append(_Chunk(avg, same, dst[part], src[part], moved, index[part]))
        # Storages whose reference counts must not change; the spans keep them alive, so the ids stay valid.
        watched = {_storage_id(g.source): g.source for g in self.flat}
        if watch_targets:
            watched.update({_storage_id(g.target): g.target for g in self.flat})
        self._watched = list(watched)
        self._spans = list(watched.values())
        self._counts = self._use_counts()
        self._work: dict[int | None, tuple[list[_FlatGroup], list[_Loose]]] = {}

    def _use_counts(self) -> list[int]:
        # Reference counts, and where the spans' data lives: a storage resized in place (as FSDP does to free
        # parameters) keeps its count but moves or drops its data.
        if _STORAGE_USE_COUNT is None:
            return []
        return [*map(_STORAGE_USE_COUNT, self._watched), *map(_DATA_PTR, self._spans)]

    def snapshot(self) -> None:
        """Record the buffers' reference counts as current. A plan kept for reuse must be snapshot after the
        plan it replaces is released, whose spans would otherwise be counted and then go missing."""
        self._counts = self._use_counts()

    @property
    def sources(self) -> list[torch.Tensor] | None:
        """Every source the plan was made with, in order, while it can be found current by reading them (a plan
        with loose pairs); None for a plan of flat groups only, which keeps no per-tensor references."""
        return self._sources if _STORAGE_USE_COUNT is not None else None

    @property
    def reusable(self) -> bool:
        """Whether the plan holds only flat groups, so that it is current without reading the tensors."""
        return not self.loose and _STORAGE_USE_COUNT is not None

    def is_current(
        self,
        sources: Sequence[torch.Tensor] | None = None,
        targets: Sequence[torch.Tensor] | None = None,
        *,
        data: bool = True,
    ) -> bool:
        """Whether the plan still pairs the same memory.

        A plan of flat groups only needs nothing more (a few integer comparisons per flat group). A plan with
        loose pairs is current only given the freshly read ``sources`` (and, if it watches its targets, the
        ``targets``), in the order the plan was made with: they must be the plan's objects, with their data
        where it was. ``data=False`` leaves the loose pairs' data to :meth:`run_checked`, which checks it
        chunk by chunk just before each kernel, while it is in cache.
        """
        if self.registrations != _registrations or _STORAGE_USE_COUNT is None:
            return False
        if torch.__future__.get_overwrite_module_params_on_conversion():
            return False
        if self._sources is not None:
            if sources is None or not _same_objects(sources, self._sources):
                return False
            if self._targets is not None and (targets is None or not _same_objects(targets, self._targets)):
                return False
            if self._empty_ptrs is None or list(map(_DATA_PTR, self._empty)) != self._empty_ptrs:
                return False
            if data and not all(chunk.unmoved() for chunk in self._chunks):
                return False
        return not self._watched or self._use_counts() == self._counts

    def run_checked(self, weight: float) -> list[int] | None:
        """:meth:`run` for a plan found current with ``is_current(..., data=False)``: each chunk of loose pairs
        runs only if its tensors' data has not moved since the plan was made (checked just before its kernel,
        which then finds the tensors' metadata in cache). Returns None when every pair ran; otherwise the
        positions (in the order the plan was made with) of the pairs that did not run, for the caller to pair
        again: a tensor was re-pointed (``param.data = ...``, ``model.to(...)``) since."""
        _run_groups(self.flat, (), weight)
        if not self._chunks:
            return None
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for i, chunk in enumerate(self._chunks):
                if not chunk.unmoved():
                    return [j for later in self._chunks[i:] for j in later.index]
                _run_loose(chunk.averaged, chunk.same, chunk.targets, chunk.sources, weight)
        finally:
            torch._C._set_grad_enabled(enabled)
        return None

    def run(self, weight: float, phase: int | None = None) -> None:
        """Blend averaged pairs (``t <- t + weight * (s - t)``) and copy the others: all of them, or the
        pairs of one ``phase``."""
        work = self._work.get(phase)
        if work is None:
            work = self._work[phase] = (self._flat_of(phase), self._loose_of(phase))
        _run_groups(work[0], work[1], weight)

    def bound(self, weight: float, phase: int | None = None) -> Callable[[], None]:
        """``run(weight, phase)`` as a call to make later, perhaps on another thread, over the memory the
        tensors hold now: the loose pairs' sources are detached here, so re-pointing a parameter
        (``param.data = ...``) before the call does not change what it reads."""
        loose = [(avg, same, dst, [s.detach() for s in src]) for avg, same, dst, src in self._loose_of(phase)]
        return functools.partial(_run_groups, self._flat_of(phase), loose, weight)

    def _flat_of(self, phase: int | None) -> list[_FlatGroup]:
        return self.flat if phase is None else [g for g in self.flat if g.phase == phase]

    def _loose_of(self, phase: int | None) -> list[_Loose]:
        return [
            (avg, dst[0].dtype == src[0].dtype and dst[0].device == src[0].device, dst, src)
            for avg, p, dst, src in self.loose
            if phase is None or p == phase
        ]


#: A loose group as run: (averaged, same dtype and device, targets, sources).
_Loose = tuple[bool, bool, list[torch.Tensor], list[torch.Tensor]]

#: Loose pairs per checked chunk: small enough that a chunk's tensors' metadata, read by the check, is still in
#: cache when its kernel reads it again; large enough that the per-chunk Python costs little.
_CHUNK_PAIRS = 64


class _Chunk:
    """Up to ``_CHUNK_PAIRS`` pairs of one loose group, with where their data was when the plan was made."""

    __slots__ = ("averaged", "index", "ptrs", "same", "sources", "targets", "watched")

    def __init__(
        self,
        averaged: bool,
        same: bool,
        targets: list[torch.Tensor],
        sources: list[torch.Tensor],
        watched: list[torch.Tensor],
        index: list[int],
    ) -> None:
        self.averaged, self.same, self.targets, self.sources, self.index = averaged, same, targets, sources, index
        self.watched = watched
        self.ptrs = _data_ptrs(watched)

    def unmoved(self) -> bool:
        return self.ptrs is not None and list(map(_DATA_PTR, self.watched)) == self.ptrs


def _data_ptrs(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """Where each tensor's data starts; None if a tensor has no data pointer (a wrapper subclass such as
    DTensor), in which case a plan reading it is never reused."""
    try:
        return list(map(_DATA_PTR, tensors))
    except RuntimeError:
        return None


def _same_objects(fresh: Sequence[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    """Whether ``fresh`` are the ``saved`` objects, in order (a C-speed loop of identity checks)."""
    return len(fresh) == len(saved) and all(map(operator.is_, fresh, saved))


def _run_groups(flat: Sequence[_FlatGroup], loose: Sequence[_Loose], weight: float) -> None:
    for group in flat:  # detached spans: no autograd bookkeeping to switch off
        if not group.averaged or weight == 1.0:
            group.target.copy_(group.source)
        elif weight != 0.0:
            if group.same:
                group.target.lerp_(group.source, weight)
            else:
                _lerp_cast_flat(group.target, group.source, weight)
    if not loose:
        return
    enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # what torch.no_grad() does, at a tenth of its cost
    try:
        for averaged, same, dst, src in loose:
            _run_loose(averaged, same, dst, src, weight)
    finally:
        torch._C._set_grad_enabled(enabled)


def _run_loose(averaged: bool, same: bool, dst: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """One group's multi-tensor kernel; the caller has switched autograd off."""
    if not averaged or weight == 1.0:
        torch._foreach_copy_(dst, src)
    elif weight != 0.0:
        if same:
            torch._foreach_lerp_(dst, src, weight)
        else:
            _lerp_cast_(dst, src, weight)


# ------------------------------------------------------------------ compute_ema's kept pairings
#
# compute_ema is called every step with the same two models. Walking both module trees, canonicalising every
# name and pairing and grouping the tensors costs far more than the update itself for small models or models
# of many small tensors, so the pairing (an UpdatePlan) is kept per (model, ema_model) and checked each call.

#: Where a tensor is read from, and the tensor: (module._parameters or module._buffers, key, tensor).
_Entry = tuple[dict[str, Any], str, torch.Tensor]
_GET = dict.__getitem__


class _Tree:
    """One module tree as compute_ema reads it, and a fingerprint of its structure that is cheap to check.

    ``entries`` are the tree's tensors by canonical name, parameters then buffers, each shared tensor once
    (as ``named_parameters`` and ``named_buffers`` list them), with where each is read from; the pairing
    drops them once paired. The fingerprint is the submodules of every module that has some, held weakly
    (a cache must never keep a model alive).
    """

    __slots__ = ("children", "entries", "parents", "widths")

    def __init__(self, model: nn.Module, what: str) -> None:
        self.parents: list[weakref.ref[nn.Module]] = []  # the modules that have submodules
        self.widths: list[int] = []  # how many submodules each has
        self.children: list[int] = []  # their ids, in order
        found: tuple[list[tuple[str, dict[str, Any], str, torch.Tensor]], ...] = ([], [])
        seen: tuple[set[int], set[int]] = (set(), set())
        visited: set[int] = set()
        stack: list[tuple[str, nn.Module]] = [("", model)]
        while stack:  # pre-order, each module once: named_modules' order
            prefix, module = stack.pop()
            if id(module) in visited:
                continue
            visited.add(id(module))
            tables: tuple[dict[str, Any], dict[str, Any]] = (module._parameters, module._buffers)
            for kind, table in enumerate(tables):
                for key, tensor in table.items():
                    if tensor is not None and id(tensor) not in seen[kind]:
                        seen[kind].add(id(tensor))
                        found[kind].append((prefix + key, table, key, tensor))
            submodules = module._modules
            if submodules:
                self.parents.append(weakref.ref(module))
                self.widths.append(len(submodules))
                self.children.extend(map(id, submodules.values()))
                for name, child in reversed(submodules.items()):
                    if child is not None:
                        stack.append((f"{prefix}{name}.", child))
        self.entries: dict[str, _Entry] = {}
        for raw, table, key, tensor in found[0] + found[1]:
            name = canonical_name(raw)
            if name in self.entries:
                raise ValueError(
                    f"{what} has two tensors named {name!r} once wrapper prefixes are removed (one is {raw!r})"
                )
            self.entries[name] = (table, key, tensor)

    def same_widths(self) -> bool:
        """Whether every module that had submodules still has as many (one ``len`` per such module)."""
        for ref, width in zip(self.parents, self.widths, strict=True):
            parent = ref()
            if parent is None or len(parent._modules) != width:
                return False
        return True

    def unchanged(self) -> bool:
        """Whether every module that had submodules still holds the same ones (``del``, direct edits of
        ``_modules`` and anything else behind torch's registration hooks)."""
        ids: list[int] = []
        for ref in self.parents:
            parent = ref()
            if parent is None:
                return False
            ids.extend(map(id, parent._modules.values()))
        return ids == self.children


def _pair(model: _Tree, ema_model: _Tree) -> tuple[list[str], list[_Entry], list[_Entry], list[bool]]:
    """The names, the (model, ema_model) entries paired by them, and per pair whether it is averaged."""
    model_entries, ema_entries = model.entries, ema_model.entries
    missing = [n for n in model_entries if n not in ema_entries]
    extra = [n for n in ema_entries if n not in model_entries]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is in model but missing from ema_model ({len(missing)} missing)")
    if extra:
        raise ValueError(f"tensor {extra[0]!r} is in ema_model but missing from model ({len(extra)} extra)")
    names, sources, targets, averaged = [], [], [], []
    for name, source in model_entries.items():
        target = ema_entries[name]
        src, dst = source[2], target[2]
        if dst.shape != src.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(src.shape)} in model and {tuple(dst.shape)} in ema_model"
            )
        if is_averaged(src) != is_averaged(dst):
            raise ValueError(
                f"tensor {name!r} is {src.dtype} in model and {dst.dtype} in ema_model: "
                "floating tensors must pair with floating tensors, integer with integer"
            )
        names.append(name)
        sources.append(source)
        targets.append(target)
        averaged.append(is_averaged(src))
    return names, sources, targets, averaged


class _Pairing:
    """compute_ema's kept work for one (model, ema_model): both trees, the pairs' locations and the plan."""

    __slots__ = (
        "averaged",
        "ema_model",
        "model",
        "names",
        "plan",
        "source_keys",
        "source_tables",
        "target_keys",
        "target_tables",
        "trees",
    )

    def __init__(self, model: nn.Module, ema_model: nn.Module, forget: Callable[[object], None]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(ema_model, nn.Module):
            raise TypeError(f"ema_model must be a torch.nn.Module, got {type(ema_model).__name__}")
        if unwrap_model(model) is unwrap_model(ema_model):
            how = "the same object" if model is ema_model else "wrappers of one module"
            raise ValueError(
                f"model and ema_model are {how} ({type(unwrap_model(model)).__name__}): compute_ema would blend it "
                "into itself and change nothing; pass the average as a separate copy, e.g. ema_model = "
                "copy.deepcopy(model)"
            )
        self.trees = (_Tree(model, "model"), _Tree(ema_model, "ema_model"))
        self.names, sources, targets, self.averaged = _pair(*self.trees)
        for tree in self.trees:
            tree.entries = {}  # a flat plan must hold no tensor, or its buffers' reference counts could not drop
        self.source_tables = [table for table, _, _ in sources]
        self.source_keys = [key for _, key, _ in sources]
        self.target_tables = [table for table, _, _ in targets]
        self.target_keys = [key for _, key, _ in targets]
        target_tensors = [t for _, _, t in targets]
        self.plan = UpdatePlan(target_tensors, [t for _, _, t in sources], self.averaged, protected=target_tensors)
        # Weak: the cache never keeps a model alive, and forgets this pairing when either model goes.
        self.model = weakref.ref(model, forget)
        self.ema_model = weakref.ref(ema_model, forget)

    def current(self, model: nn.Module, ema_model: nn.Module) -> bool:
        """Whether the plan still pairs these two models' tensors: far cheaper than pairing them again.

        - Parameters, buffers or submodules registered anywhere (``module.weight = nn.Parameter(...)``,
          ``load_state_dict(assign=True)``, a module added) change :func:`registration_count`.
        - Submodules removed or replaced behind those hooks (``del model.fc``, ``model._modules[...] = ...``)
          change the trees' fingerprints.
        - Every tensor is read again where it lives (``module._parameters[key]``, ``module._buffers[key]``):
          a tensor replaced there (``model.to()`` replaces buffers) is another object, a deleted one is
          missing, and a tensor re-pointed in place (``param.data = ...``, ``model.to(dtype or device)`` on
          parameters, ``swap_tensors``) has moved its data.

        Flat plans (both models flattened alike) skip the reading and watch their buffers' reference
        counts instead (see :class:`UpdatePlan`). Not noticed: a tensor inserted under a new key straight
        into a module's ``_parameters`` or ``_buffers`` dict, which no torch API does.
        """
        if self.model() is not model or self.ema_model() is not ema_model:
            return False
        plan = self.plan
        source_tree, target_tree = self.trees
        if plan.reusable:
            return source_tree.same_widths() and target_tree.same_widths() and plan.is_current()
        if plan.registrations != _registrations or not (source_tree.unchanged() and target_tree.unchanged()):
            return False
        try:
            sources = list(map(_GET, self.source_tables, self.source_keys))
            targets = list(map(_GET, self.target_tables, self.target_keys))
        except KeyError:  # a tensor deleted from its module
            return False
        return plan.is_current(sources, targets, data=False)  # the data is checked as the plan runs

    def run_some(self, names: Sequence[str], weight: float) -> None:
        """Update only the pairs of ``names``, with a plan made for them now (the rest ran already)."""
        wanted = set(names)
        targets = list(map(_GET, self.target_tables, self.target_keys))
        sources = list(map(_GET, self.source_tables, self.source_keys))
        pick = [i for i, name in enumerate(self.names) if name in wanted]
        some = ([targets[i] for i in pick], [sources[i] for i in pick], [self.averaged[i] for i in pick])
        UpdatePlan(*some, protected=targets).run(weight)


#: (id(model), id(ema_model)) -> the kept pairing; an entry goes when either model is garbage collected.
_pairings: dict[tuple[int, int], _Pairing] = {}


def _forgetter(key: tuple[int, int]) -> Callable[[object], None]:
    def forget(_: object) -> None:
        _pairings.pop(key, None)

    return forget


def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place toward ``model``: ``ema = smoothing * ema + (1 - smoothing) * model``.

    Parameters and buffers are paired by canonical name, so either side may be wrapped in DDP or
    ``torch.compile``. Floating tensors are blended (the EMA may use a wider dtype than the model);
    integer and bool buffers are copied. ``smoothing`` is the fraction of the old average kept per call:
    0 copies the model, 1 leaves the average unchanged.

    The pairing is made on the first call for two models and kept (weakly: it never keeps a model alive):
    later calls check, far more cheaply than pairing again, that neither model changed (a parameter
    replaced or re-pointed, ``model.to(...)``, a module added or removed; see :class:`UpdatePlan`) and run
    one multi-tensor kernel per (device, dtype) group. When both models are flattened
    (:func:`emakit.flatten.flatten_model_`) with the same layout, each group is one kernel over one buffer.
    Wrapping a model later (DDP, ``torch.compile``) passes another object, which is paired afresh.

    Raises:
        ValueError: ``smoothing`` is not a real number in [0, 1]; ``model`` and ``ema_model`` are the same
            module (or wrap it); a tensor is present on one side only; shapes differ; or a floating tensor
            pairs with an integer one.
        TypeError: ``model`` or ``ema_model`` is not a ``torch.nn.Module``.
    """
    if type(smoothing) is not float or not 0.0 <= smoothing <= 1.0:  # the common case checked in two steps
        smoothing = validate_smoothing(smoothing)
    weight = 1.0 - smoothing
    key = (id(model), id(ema_model))
    pairing = _pairings.get(key)
    left: list[str] | None = None
    if pairing is not None and pairing.current(model, ema_model):
        unrun = pairing.plan.run_checked(weight)
        if unrun is None:
            return
        left = [pairing.names[i] for i in unrun]  # a tensor moved since: these pairs have not run
    _pairings.pop(key, None)
    del pairing  # release the old plan's spans before the new plan counts references
    pairing = _Pairing(model, ema_model, _forgetter(key))
    _pairings[key] = pairing
    if left is None:
        pairing.plan.run(weight)
    else:
        pairing.run_some(left, weight)


def _kept_plan(model: nn.Module, ema_model: nn.Module) -> UpdatePlan | None:
    """The plan compute_ema keeps for these two models, if any (for tests and benchmarks)."""
    pairing = _pairings.get((id(model), id(ema_model)))
    return pairing.plan if pairing is not None and pairing.model() is model else None
