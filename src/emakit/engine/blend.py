"""Several averages of the same weights, updated with one read of the weights.

An update of ``k`` averages is ``avg_j <- avg_j + w_j (src - avg_j)`` (``lerp_``) for every ``j``. Done as ``k``
separate passes it reads the source ``k`` times: ``3k`` units of memory traffic (read source, read and write
the average). :func:`blend_averages_` walks each source in cache-sized chunks and blends every average's chunk
while the source chunk is still in cache, so the source is read from memory once: ``1 + 2k`` units, the
limit for any implementation. A 16-bit source of fp32 averages is cast once per chunk into a small scratch
buffer and blended ``k`` times from there. Integer and bool tensors (step counters) are copied into every
average. Small tensors are batched (up to one chunk of elements) into multi-tensor kernels.

Run ``python -m emakit.bench.blend_timing`` for the timing against one
flat ``lerp_``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emakit._compat import FOREACH_LERP_PER_TENSOR
from emakit.engine.kernels import validate_smoothing
from emakit.engine.naming import is_averaged
from emakit.engine.plan import below_autograd

__all__ = ["PreparedBlend", "blend_averages_", "chunk_elements"]

# Elements per source chunk. The source chunk has to stay in cache while the k averages' chunks stream past
# it; see emakit.bench.blend_timing for the measurement behind the CPU figure. On GPUs the L2 cache is tens of MiB.
_CPU_CHUNK = 1 << 17
_GPU_CHUNK = 1 << 21

_Key = tuple[torch.device, torch.dtype]
# torch >= 2.6 (about) takes one weight per tensor pair in _foreach_lerp_.
_SCALAR_LIST = FOREACH_LERP_PER_TENSOR


def chunk_elements(device: torch.device) -> int:
    """Source elements blended per chunk on ``device`` (the default of :func:`blend_averages_`)."""
    return _GPU_CHUNK if device.type == "cuda" else _CPU_CHUNK


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ValueError(f"weights must have one entry per average ({count}), got {len(weights)}")
    return [validate_smoothing(w, f"weights[{j}]") for j, w in enumerate(weights)]


def _check(
    averages: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor], weights: Sequence[float]
) -> list[float]:
    checked = _check_weights(weights, len(averages))
    for j, average in enumerate(averages):
        if len(average) != len(sources):
            raise ValueError(
                f"averages[{j}] must hold one tensor per source ({len(sources)} sources), got {len(average)}"
            )
        for i, (target, source) in enumerate(zip(average, sources, strict=True)):
            if target.shape != source.shape:
                raise ValueError(
                    f"averages[{j}][{i}] has shape {tuple(target.shape)}, its source has {tuple(source.shape)}"
                )
            if is_averaged(target) != is_averaged(source):
                raise ValueError(
                    f"averages[{j}][{i}] is {target.dtype}, its source is {source.dtype}: "
                    "floating averages need floating sources, copied integer tensors need integer ones"
                )
    return checked


@torch.no_grad()
def blend_averages_(
    averages: Sequence[Sequence[torch.Tensor]],
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    chunk: int | None = None,
) -> None:
    """In place, ``averages[j][i].lerp_(sources[i], weights[j])`` for every ``j`` and ``i``, reading each source once.

    ``averages[j]`` pairs with ``sources`` by position (same shapes). ``weights[j]`` is ``1 - beta`` of average
    ``j`` (1 copies, 0 leaves it unchanged). Averages may be kept in another dtype than their sources (fp32
    averages of bf16 weights) or on another device. Integer and bool tensors are copied into every average
    whatever the weights. ``chunk`` overrides the elements blended per pass (:func:`chunk_elements`).

    Raises:
        ValueError: a weight is not in [0, 1], or the lengths, shapes or kinds (floating/integer) do not pair up.
    """
    blend = _check(averages, sources, weights)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer number of elements, got {chunk!r}")
    with below_autograd():
        _blend_every(averages, sources, blend, chunk)


def _blend_every(
    averages: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor], blend: list[float], chunk: int | None
) -> None:
    """:func:`blend_averages_` once its arguments are checked, with gradients off."""
    active = [j for j, w in enumerate(blend) if w != 0.0]
    groups: dict[tuple[_Key, tuple[_Key, ...]], list[int]] = {}
    copies: list[int] = []
    for i, source in enumerate(sources):
        if not is_averaged(source):
            copies.append(i)
        elif active:
            key = ((source.device, source.dtype), tuple((averages[j][i].device, averages[j][i].dtype) for j in active))
            groups.setdefault(key, []).append(i)
    if copies:
        for average in averages:
            torch._foreach_copy_([average[i] for i in copies], [sources[i] for i in copies])
    for ((device, dtype), target_keys), members in groups.items():
        size = chunk or chunk_elements(device)
        _blend_group(
            [[averages[j][i] for i in members] for j in active],
            [sources[i] for i in members],
            [blend[j] for j in active],
            (device, dtype),
            list(target_keys),
            size,
        )


def _blend_group(
    targets: list[list[torch.Tensor]],
    sources: list[torch.Tensor],
    weights: list[float],
    source_key: _Key,
    target_keys: list[_Key],
    size: int,
) -> None:
    """Blend one group (one source dtype/device, one dtype/device per average) unit by unit.

    A *unit* is one chunk of a large tensor or a batch of small tensors of at most ``size`` elements in all.
    Averages with weight 1 are copies (exact even over uninitialised memory); the others are lerped.
    """
    casts = sorted({key for key in target_keys if key != source_key}, key=str)
    scratch = {key: torch.empty(size, dtype=key[1], device=key[0]) for key in casts}
    lerped = [j for j, w in enumerate(weights) if w != 1.0]
    copied = [j for j, w in enumerate(weights) if w == 1.0]
    units: list[tuple[list[torch.Tensor], list[list[torch.Tensor]]]] = []
    batch: list[int] = []
    used = 0

    def flush() -> None:
        nonlocal batch, used
        if batch:
            units.append(([sources[i] for i in batch], [[average[i] for i in batch] for average in targets]))
        batch, used = [], 0

    for i, source in enumerate(sources):
        n = source.numel()
        column = [average[i] for average in targets]
        if n > size and source.is_contiguous() and all(t.is_contiguous() for t in column):
            flush()
            pieces = [t.view(-1).split(size) for t in column]
            for c, part in enumerate(source.view(-1).split(size)):
                units.append(([part], [[p[c]] for p in pieces]))
            continue
        if used + n > size:
            flush()
        batch.append(i)
        used += n
    flush()
    if not scratch and lerped and (len(lerped) == 1 or _SCALAR_LIST):
        # Same dtype: the whole group is one multi-tensor call, ordered unit by unit, so each source piece is
        # blended into every average while it is in cache.
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        blend: list[float] = []
        for own, column_parts in units:
            for j in lerped:
                dst.extend(column_parts[j])
                src.extend(own)
                blend.extend([weights[j]] * len(own))
        if len(lerped) == 1:
            torch._foreach_lerp_(dst, src, weights[lerped[0]])
        else:
            torch._foreach_lerp_(dst, src, blend)
        lerped = []
    for own, column_parts in units:
        cast = {key: _cast_into(buffer, own) for key, buffer in scratch.items()}
        for j in lerped:
            if len(own) == 1 and own[0].numel() > size:  # a strided large tensor: no chunks, no scratch
                column_parts[j][0].lerp_(own[0].to(device=target_keys[j][0], dtype=target_keys[j][1]), weights[j])
            else:
                torch._foreach_lerp_(column_parts[j], cast.get(target_keys[j], own), weights[j])
        for j in copied:
            torch._foreach_copy_(column_parts[j], own)


class PreparedBlend:
    """:func:`blend_averages_` over the same tensors again and again, with the chunk lists built once.

    Per update, :func:`blend_averages_` splits every large tensor into chunks and builds the lists for the
    multi-tensor kernels: Python work that grows with the number of chunks, a few percent of a 100 MB update.
    Made once for tensors that stay where they are (a flattened model's spans, or every tensor of a model
    whose update plan is current), the update is then one ``_foreach_lerp_`` over prepared lists when the
    sources and averages share one dtype and device and every weight is strictly between 0 and 1; any other
    call falls back to :func:`blend_averages_`. The tensors must keep their storage for as long as the object
    is used (the caller's plan decides when to make a new one).
    """

    def __init__(
        self, averages: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor], *, chunk: int | None = None
    ) -> None:
        _check(averages, sources, [0.0] * len(averages))
        self.averages = [list(average) for average in averages]
        self.sources = list(sources)
        self.chunk = chunk
        blended = [i for i, s in enumerate(self.sources) if is_averaged(s)]
        copied = [i for i, s in enumerate(self.sources) if not is_averaged(s)]
        keys = {(t.device, t.dtype) for i in blended for t in [self.sources[i], *(a[i] for a in self.averages)]}
        dense = all(t.is_contiguous() for i in blended for t in [self.sources[i], *(a[i] for a in self.averages)])
        #: Whether the fast path applies (one dtype and device, contiguous tensors, per-tensor weights in torch).
        self.fused = _SCALAR_LIST and len(keys) <= 1 and dense
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self._owner: list[int] = []
        self._copy_dst = [[average[i] for i in copied] for average in self.averages]
        self._copy_src = [self.sources[i] for i in copied]
        if self.fused and blended:
            size = chunk or chunk_elements(self.sources[blended[0]].device)
            for i in blended:  # each source piece is blended into every average while it is in cache
                pieces = [a[i].view(-1).split(size) for a in self.averages]
                for c, part in enumerate(self.sources[i].view(-1).split(size)):
                    for j, average_pieces in enumerate(pieces):
                        self._dst.append(average_pieces[c])
                        self._src.append(part)
                        self._owner.append(j)

    @torch.no_grad()
    def __call__(self, weights: Sequence[float]) -> None:
        """In place, every ``averages[j][i].lerp_(sources[i], weights[j])``; integer tensors are copied."""
        blend = _check_weights(weights, len(self.averages))
        if not self.fused or not all(0.0 < w < 1.0 for w in blend):
            blend_averages_(self.averages, self.sources, blend, chunk=self.chunk)
            return
        with below_autograd():
            for dst in self._copy_dst:
                if dst:
                    torch._foreach_copy_(dst, self._copy_src)
            if self._dst:
                torch._foreach_lerp_(self._dst, self._src, [blend[j] for j in self._owner])


def _cast_into(buffer: torch.Tensor, sources: list[torch.Tensor]) -> list[torch.Tensor]:
    """``sources`` copied (cast) into consecutive views of ``buffer``; ``sources`` itself if it does not fit."""
    total = sum(s.numel() for s in sources)
    if total > buffer.numel():
        return sources
    views, offset = [], 0
    for s in sources:
        views.append(buffer[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    torch._foreach_copy_(views, sources)
    return views
