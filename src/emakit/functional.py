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
(:class:`UpdatePlan`).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    buffers) lives there. The remaining pairs use the grouped multi-tensor kernels.

    A plan made only of flat groups keeps no per-tensor references and may be reused while
    :meth:`is_current`: no module anywhere registered a parameter, buffer or submodule since (see
    :func:`registration_count`), the reference count of every buffer it reads is unchanged (it drops when a
    tensor is re-pointed away from the buffer: ``param.data = ...``, ``model.to(other dtype or device)``,
    ``torch.utils.swap_tensors``), its data has not moved (a storage resized in place), and torch's
    ``overwrite_module_params_on_conversion`` is off. A stale
    plan is never used: the caller pairs the tensors again, which falls back to the grouped path for pairs
    that are no longer flat.

    Args:
        targets, sources: the pairs, position by position; zero-size pairs are skipped.
        averaged: per pair, blend (True) or copy (False).
        protected: tensors that a flat group must not write into unless they are its own targets.
        watch_targets: also watch the targets' buffers (False when the caller owns them).
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
        loose_index: list[int] = []
        for (avg, phase, plain, _), index in groups.items():
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
            if leftover:
                self.loose.append((avg, phase, [targets[i] for i in leftover], [sources[i] for i in leftover]))
                loose_index += leftover
        # What the loose pairs' sources were, to re-validate them against freshly read sources (see is_current).
        self._loose_index = loose_index
        self._loose_sources = [sources[i] for i in loose_index]
        # Storages whose reference counts must not change; the spans keep them alive, so the ids stay valid.
        watched = {_storage_id(g.source): g.source for g in self.flat}
        if watch_targets:
            watched.update({_storage_id(g.target): g.target for g in self.flat})
        self._watched = list(watched)
        self._spans = list(watched.values())
        self._counts = self._use_counts()

    def _use_counts(self) -> list[int]:
        # Reference counts, and where the spans' data lives: a storage resized in place (as FSDP does to free
        # parameters) keeps its count but moves or drops its data.
        if _STORAGE_USE_COUNT is None:
            return []
        return [*map(_STORAGE_USE_COUNT, self._watched), *map(torch.Tensor.data_ptr, self._spans)]

    def snapshot(self) -> None:
        """Record the buffers' reference counts as current. A plan kept for reuse must be snapshot after the
        plan it replaces is released, whose spans would otherwise be counted and then go missing."""
        self._counts = self._use_counts()

    @property
    def reusable(self) -> bool:
        """Whether the plan holds only flat groups, so that it can be reused while :meth:`is_current`."""
        return not self.loose and _STORAGE_USE_COUNT is not None

    def is_current(self, sources: Sequence[torch.Tensor] | None = None) -> bool:
        """Whether the plan still pairs the same memory (cheap: a few integer comparisons per flat group).

        A plan with loose (non-flat) pairs is current only given the freshly read ``sources`` (in the order
        the plan was made with), of which the loose ones must be the same objects: one identity check per
        loose tensor instead of pairing them again. (The loose kernels regroup by dtype and device on every
        call, so a tensor converted in place, ``param.data = param.double()``, is still handled.)
        """
        if _STORAGE_USE_COUNT is None or self.registrations != _registrations:
            return False
        if torch.__future__.get_overwrite_module_params_on_conversion():
            return False
        if self.loose:
            if sources is None:
                return False
            fresh = [sources[i] for i in self._loose_index]
            if not all(map(operator.is_, fresh, self._loose_sources)):
                return False
        return self._use_counts() == self._counts

    def run(self, weight: float, phase: int | None = None) -> None:
        """Blend averaged pairs (``t <- t + weight * (s - t)``) and copy the others: all of them, or the
        pairs of one ``phase``."""
        _run_groups(self._flat_of(phase), self._loose_of(phase), weight)

    def bound(self, weight: float, phase: int | None = None) -> Callable[[], None]:
        """``run(weight, phase)`` as a call to make later, perhaps on another thread, over the memory the
        tensors hold now: the loose pairs' sources are detached here, so re-pointing a parameter
        (``param.data = ...``) before the call does not change what it reads."""
        loose = [(avg, dst, [s.detach() for s in src]) for avg, dst, src in self._loose_of(phase)]
        return functools.partial(_run_groups, self._flat_of(phase), loose, weight)

    def _flat_of(self, phase: int | None) -> list[_FlatGroup]:
        return self.flat if phase is None else [g for g in self.flat if g.phase == phase]

    def _loose_of(self, phase: int | None) -> list[tuple[bool, list[torch.Tensor], list[torch.Tensor]]]:
        return [(avg, dst, src) for avg, p, dst, src in self.loose if phase is None or p == phase]


def _run_groups(
    flat: Sequence[_FlatGroup], loose: Sequence[tuple[bool, list[torch.Tensor], list[torch.Tensor]]], weight: float
) -> None:
    for group in flat:  # detached spans: no autograd bookkeeping to switch off
        if not group.averaged or weight == 1.0:
            group.target.copy_(group.source)
        elif weight != 0.0:
            if group.same:
                group.target.lerp_(group.source, weight)
            else:
                _lerp_cast_flat(group.target, group.source, weight)
    if loose:
        with torch.no_grad():
            for avg, dst, src in loose:
                if avg:
                    lerp_tensors_(dst, src, weight)
                else:
                    copy_tensors_(dst, src)


def _pair(
    model_tensors: Mapping[str, torch.Tensor], ema_tensors: Mapping[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    missing = [n for n in model_tensors if n not in ema_tensors]
    extra = [n for n in ema_tensors if n not in model_tensors]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is in model but missing from ema_model ({len(missing)} missing)")
    if extra:
        raise ValueError(f"tensor {extra[0]!r} is in ema_model but missing from model ({len(extra)} extra)")
    avg_ema, avg_src, copy_ema, copy_src = [], [], [], []
    for name, src in model_tensors.items():
        dst = ema_tensors[name]
        if dst.shape != src.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(src.shape)} in model and {tuple(dst.shape)} in ema_model"
            )
        if is_averaged(src) and is_averaged(dst):
            avg_ema.append(dst)
            avg_src.append(src)
        elif not is_averaged(src) and not is_averaged(dst):
            copy_ema.append(dst)
            copy_src.append(src)
        else:
            raise ValueError(
                f"tensor {name!r} is {src.dtype} in model and {dst.dtype} in ema_model: "
                "floating tensors must pair with floating tensors, integer with integer"
            )
    return avg_ema, avg_src, copy_ema, copy_src


def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place toward ``model``: ``ema = smoothing * ema + (1 - smoothing) * model``.

    Parameters and buffers are paired by canonical name, so either side may be wrapped in DDP or
    ``torch.compile``. Floating tensors are blended (the EMA may use a wider dtype than the model);
    integer and bool buffers are copied. ``smoothing`` is the fraction of the old average kept per call:
    0 copies the model, 1 leaves the average unchanged.

    When both models are flattened (:func:`emakit.flatten.flatten_model_`) with the same layout, each group of
    tensors is updated by one kernel, and the pairing is reused across calls until a module of either model
    changes (see :class:`UpdatePlan`).

    Raises:
        ValueError: ``smoothing`` is not a real number in [0, 1]; a tensor is present on one side only;
            shapes differ; or a floating tensor pairs with an integer one.
    """
    weight = 1.0 - validate_smoothing(smoothing)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(ema_model, nn.Module):
        raise TypeError(f"ema_model must be a torch.nn.Module, got {type(ema_model).__name__}")
    per_model = _compute_plans.get(model)
    if per_model is None:
        per_model = _compute_plans.setdefault(model, weakref.WeakKeyDictionary())
    cached = per_model.get(ema_model)
    if cached is not None:
        tables, sizes, plan = cached
        if plan.is_current() and list(map(len, tables)) == sizes:
            plan.run(weight)
            return
        del per_model[ema_model], cached, plan  # release its spans before the new plan counts references
    avg_ema, avg_src, copy_ema, copy_src = _pair(named_tensors(model), named_tensors(ema_model))
    targets = avg_ema + copy_ema
    plan = UpdatePlan(targets, avg_src + copy_src, [True] * len(avg_ema) + [False] * len(copy_ema), protected=targets)
    plan.run(weight)
    if plan.reusable:
        # The pairing by name stays valid while no module of either model gains or loses an entry.
        tables = [t for m in (*model.modules(), *ema_model.modules()) for t in (m._parameters, m._buffers, m._modules)]
        per_model[ema_model] = (tables, list(map(len, tables)), plan)


# model -> ema_model -> (module tables, their sizes, plan): compute_ema's reusable pairings, held weakly.
_compute_plans: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[nn.Module, Any]] = (
    weakref.WeakKeyDictionary()
)
