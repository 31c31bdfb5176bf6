"""Several averages of the same weights, updated with one read of the weights.

An update of ``k`` averages is ``avg_j <- avg_j + w_j (src - avg_j)`` (``lerp_``) for every ``j``. Done as ``k``
separate passes it reads the source ``k`` times: ``3k`` units of memory traffic (read source, read and write
the average). :func:`blend_averages_` walks each source in cache-sized chunks and blends every average's chunk
while the source chunk is still in cache, so the source is read from memory once: ``1 + 2k`` units, the
limit for any implementation. A 16-bit source of fp32 averages is cast once per chunk into a small scratch
buffer and blended ``k`` times from there. Integer and bool tensors (step counters) are copied into every
average. Small tensors are batched (up to one chunk of elements) into multi-tensor kernels.

Run ``python -m emakit.posthoc.kernels`` for the timing against one flat ``lerp_``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from emakit.functional import is_averaged, validate_smoothing

__all__ = ["blend_averages_", "chunk_elements", "main"]

# Elements per source chunk. The source chunk has to stay in cache while the k averages' chunks stream past
# it; see main() for the measurement behind the CPU figure. On GPUs the L2 cache is tens of MiB.
_CPU_CHUNK = 1 << 17
_GPU_CHUNK = 1 << 21

_Key = tuple[torch.device, torch.dtype]
# torch >= 2.6 (about) takes one weight per tensor pair in _foreach_lerp_.
_SCALAR_LIST = "ScalarList" in torch.ops.aten._foreach_lerp_.overloads()


def chunk_elements(device: torch.device) -> int:
    """Source elements blended per chunk on ``device`` (the default of :func:`blend_averages_`)."""
    return _GPU_CHUNK if device.type == "cuda" else _CPU_CHUNK


def _check(
    averages: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor], weights: Sequence[float]
) -> list[float]:
    if len(weights) != len(averages):
        raise ValueError(f"weights must have one entry per average ({len(averages)}), got {len(weights)}")
    checked = [validate_smoothing(w, f"weights[{j}]") for j, w in enumerate(weights)]
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


# ---------------------------------------------------------------------------------------------- benchmark
def main(numel: int = 25_557_032, repeats: int = 15, threads: int = 1) -> None:
    """Print the time of k = 2 and 4 averages in one pass relative to one flat ``lerp_`` of fp32 buffers.

    ``numel`` defaults to ResNet-50's parameter count, split into three flat buffers as a flattened model's
    storage would be. The memory-traffic limit of k averages is ``(1 + 2k) / 3`` flat lerps; k separate lerps
    cost ``k``. "targets only" blends k averages from a source that stays in cache: what streaming the
    averages alone costs on this machine, a floor for any one-pass kernel. Times are the best of ``repeats``
    runs, interleaved, measured in this thread's CPU time so that other processes on a busy machine do not
    count (memory stalls do).
    """
    torch.set_num_threads(threads)
    sizes = [numel // 2, numel // 4, numel - numel // 2 - numel // 4]
    sources = [torch.randn(n) for n in sizes]
    averages = [[torch.randn(n) for n in sizes] for _ in range(4)]
    cached = torch.randn(chunk_elements(torch.device("cpu")))
    runs: dict[str, Callable[[], None]] = {}

    def flat() -> None:
        for avg, src in zip(averages[0], sources, strict=True):
            avg.lerp_(src, 0.01)

    runs["flat"] = flat
    for k in (2, 4):
        weights = [0.01 * (j + 1) for j in range(k)]

        def one_pass(k: int = k, weights: list[float] = weights) -> None:
            blend_averages_(averages[:k], sources, weights)

        def separate(k: int = k, weights: list[float] = weights) -> None:
            for j in range(k):
                for avg, src in zip(averages[j], sources, strict=True):
                    avg.lerp_(src, weights[j])

        def targets_only(k: int = k, weights: list[float] = weights) -> None:
            size = cached.numel()
            dst = [piece for j in range(k) for avg in averages[j] for piece in avg.split(size)]
            blend = [weights[j] for j in range(k) for avg in averages[j] for _ in avg.split(size)]
            torch._foreach_lerp_(dst, [cached[: p.numel()] for p in dst], blend)

        runs[f"one pass {k}"], runs[f"separate {k}"], runs[f"targets only {k}"] = one_pass, separate, targets_only
    best = dict.fromkeys(runs, math.inf)
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - start)
    one = best["flat"]
    print(f"fp32, {numel / 1e6:.1f}M elements in {len(sizes)} flat buffers, {threads} thread(s), best of {repeats}")
    print(f"one flat lerp_: {one * 1e3:.1f} ms (CPU time), ratios to it:")
    print(
        f"{'k':>2} {'one pass':>9} {'limit (1+2k)/3':>15} {'one pass / limit':>17} {'k separate':>11} {'targets only':>13}"
    )
    for k in (2, 4):
        fused = best[f"one pass {k}"] / one
        limit = (1 + 2 * k) / 3
        print(
            f"{k:>2} {fused:>8.2f}x {limit:>14.2f}x {fused / limit:>16.2f}x "
            f"{best[f'separate {k}'] / one:>10.2f}x {best[f'targets only {k}'] / one:>12.2f}x"
        )


if __name__ == "__main__":
    main()
