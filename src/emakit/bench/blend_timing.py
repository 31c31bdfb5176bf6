"""Timing of several averages in one pass (:mod:`emakit.engine.blend`) against one flat ``lerp_``.

``python -m emakit.bench.blend_timing`` prints the ratios;
``--help`` lists the options. Times are CPU time of this thread, so that other processes do not count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from emakit._cli_args import Parser, checked
from emakit.engine.blend import PreparedBlend, blend_averages_, chunk_elements

__all__ = ["cli", "main"]


def main(numel: int = 25_557_032, repeats: int = 15, threads: int = 1) -> None:
    """Print the time of k = 2 and 4 averages in one pass relative to one flat ``lerp_`` of fp32 buffers.

    ``numel`` defaults to ResNet-50's parameter count, split into three flat buffers as a flattened model's
    storage would be. The memory-traffic limit of k averages is ``(1 + 2k) / 3`` flat lerps; k separate lerps
    cost ``k``. "prepared" is :class:`PreparedBlend` (what the EMA runs). "targets only" blends k averages
    from a source that stays in cache: what streaming the averages alone costs on this machine, a floor for
    any one-pass kernel. Times are the best of ``repeats``
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

        kept = PreparedBlend(averages[:k], sources)
        runs[f"prepared {k}"] = lambda kept=kept, weights=weights: kept(weights)  # type: ignore[misc]

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
        f"{'k':>2} {'limit (1+2k)/3':>15} {'one pass':>9} {'/ limit':>8} {'prepared':>9} {'/ limit':>8}"
        f" {'k separate':>11} {'targets only':>13}"
    )
    for k in (2, 4):
        fused, prepared = best[f"one pass {k}"] / one, best[f"prepared {k}"] / one
        limit = (1 + 2 * k) / 3
        print(
            f"{k:>2} {limit:>14.2f}x {fused:>8.2f}x {fused / limit:>7.2f}x {prepared:>8.2f}x {prepared / limit:>7.2f}x"
            f" {best[f'separate {k}'] / one:>10.2f}x {best[f'targets only {k}'] / one:>12.2f}x"
        )


def cli(argv: Sequence[str] | None = None, prog: str = "python -m emakit.bench.blend_timing") -> int:
    """Parse ``argv`` and run :func:`main`; returns the exit status."""
    positive = checked(int, lambda v: v >= 1, "a positive integer")
    parser = Parser(prog=prog, description=(main.__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--numel", type=positive, default=25_557_032, help="elements in all (default: ResNet-50's)")
    parser.add_argument("--repeats", type=positive, default=15, help="timed runs of each kernel (default: 15)")
    parser.add_argument("--threads", type=positive, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    main(args.numel, args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
