"""``emakit bench``: what one EMA update costs, next to the memory-bound limit and the libraries users pick instead.

An EMA update reads the weights and reads and writes the average, so its *limit* is one fused kernel over one
flat buffer of the same size (a single ``lerp_``), and the least an update of separate tensors costs, its
*floor*, is one bare ``torch._foreach_lerp_`` over lists built beforehand. Every row is a ratio to both,
measured in the same process with the same thread count, rounds interleaved so that background load hits all
rows alike. Four model shapes: a ResNet-50-like conv net (~25M parameters, 320 tensors), a ViT-B-like
transformer (~86M, 152 tensors), 2,000 ``Linear(15, 16)`` (4,000 small tensors, where per-tensor overhead
dominates) and a 9-tensor MLP (where the fixed cost of a call does). Peers (timm, torch's AveragedModel,
ema-pytorch, torch_ema, diffusers, Composer) are used if importable (see :mod:`emakit.bench.peers`). Further
sections: the cost of a non-finite check, the update's share of a training step, overlapping it with the next
step, an fp32 EMA of a bf16 model, each averaging rule and write-back next to a
plain EMA (:mod:`~emakit.bench.rules`), and (with CUDA) GB/s for a 1B-parameter model.

Run ``emakit bench`` or ``python benchmarks/update_cost.py``; ``--quick`` shrinks everything to a smoke test.
Progress goes to stderr, tables to stdout.

Modules: :mod:`~emakit.bench.shapes` (the models), :mod:`~emakit.bench.peers`, :mod:`~emakit.bench.timing`,
:mod:`~emakit.bench.report` (tables), :mod:`~emakit.bench.sections` (what is measured).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from emakit.bench.peers import SMOOTHING, Peer, load_peers
from emakit.bench.report import Progress, Table, machine
from emakit.bench.rules import bench_rules
from emakit.bench.sections import (
    bench_averages,
    bench_cuda,
    bench_mixed,
    bench_overlap,
    bench_shape,
    bench_step_share,
)
from emakit.bench.shapes import SHAPES, build_model
from emakit.bench.timing import time_interleaved

#: A section: its name in the progress lines, and what measures it.
Section = tuple[str, Callable[[], Sequence[Table | str]]]

__all__ = ["SHAPES", "Table", "build_model", "main", "run", "time_interleaved"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emakit bench",
        description="Time one EMA update for emakit, the memory-bound limit, the multi-tensor floor and installed "
        "peer libraries.",
    )
    parser.add_argument("--quick", action="store_true", help="small models and few repeats: a smoke test in seconds")
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated subset of {','.join(SHAPES)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 15, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current setting)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this thread's CPU time instead of the wall clock, so that other processes competing for the "
        "cores do not inflate the figures (needs --threads 1 and no GPU; the overlap table keeps the wall clock)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--no-step", action="store_true", help="skip the training-step share")
    parser.add_argument("--no-mixed", action="store_true", help="skip the fp32-EMA-of-bf16 table")
    parser.add_argument("--no-overlap", action="store_true", help="skip the overlapped-update table")
    parser.add_argument("--no-averages", action="store_true", help="skip the several-averages (post-hoc EMA) table")
    parser.add_argument("--no-rules", action="store_true", help="skip the rules and write-back table")
    parser.add_argument(
        "--rules-only",
        action="store_true",
        help="only the table of each averaging rule and write-back per update next to a plain EMA",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    return parser


def _parse_shapes(text: str, parser: argparse.ArgumentParser) -> list[str]:
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"--shapes: expected a comma-separated subset of {','.join(SHAPES)}, got {text!r}")
    return shapes


def run(args: argparse.Namespace, peers: dict[str, Peer] | None = None) -> Iterator[Table | str]:
    """The benchmark's tables, in order, as they are measured; progress lines go to stderr."""
    rules: Section = ("rules and write-back", lambda: [bench_rules(args)])
    if args.rules_only:
        yield from _measured([rules])
        return
    sections: list[Section] = [
        (f"shape {shape}", functools.partial(bench_shape, shape, args, peers or {})) for shape in args.shapes
    ]
    if not args.no_step:
        sections.append(("share of a training step", lambda: [bench_step_share(args)]))
    if not args.no_mixed and "resnet" in args.shapes:
        sections.append(("fp32 EMA of a bf16 model", lambda: [bench_mixed(args)]))
    if not args.no_overlap:
        sections.append(("overlapped updates", lambda: [bench_overlap(args)]))
    if not args.no_averages and "resnet" in args.shapes:
        sections.append(("several averages in one pass", lambda: [bench_averages(args)]))
    if not args.no_rules:
        sections.append(rules)
    sections.append(("CUDA", lambda: [bench_cuda(args)]))
    yield from _measured(sections)


def _measured(sections: list[Section]) -> Iterator[Table | str]:
    """Each section's tables in turn, a progress line to stderr before each."""
    progress = Progress(len(sections))
    for what, measure in sections:
        progress(what)
        yield from measure()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    args.shapes = _parse_shapes(args.shapes, parser)
    if args.rules_only and args.no_rules:
        parser.error("--rules-only and --no-rules: give one of them, not both")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: must be at least 1, got {args.threads}")
    threads = torch.get_num_threads() if args.threads is None else args.threads
    if args.cpu_time and (threads != 1 or torch.cuda.is_available()):
        parser.error(
            f"--cpu-time: counts only the calling thread's work, so it needs --threads 1 and no GPU, got "
            f"{threads} torch threads{' and CUDA' if torch.cuda.is_available() else ''}"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.clock = time.thread_time if args.cpu_time else time.perf_counter
    args.target_s = 0.002 if args.quick else 0.01
    start = time.perf_counter()
    print(machine(), flush=True)
    clock = "this thread's CPU time" if args.cpu_time else "wall clock"
    print(f"smoothing {SMOOTHING}; median of {args.repeats} interleaved rounds per row; {clock}", flush=True)
    if args.quick:
        print(
            "--quick: small models and few rounds; the figures show that every row runs, not what it costs", flush=True
        )
    peers: dict[str, Peer] = {}
    if not args.no_peers and not args.rules_only:
        print("[peers] importing ...", file=sys.stderr, flush=True)
        peers, lines = load_peers()
        print("peers:\n" + "\n".join(f"  {line}" for line in lines), flush=True)
    print(flush=True)
    for item in run(args, peers):
        print(item.render(args.markdown) if isinstance(item, Table) else item + "\n", flush=True)
    print(f"finished in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return 0
