"""``emakit posthoc SNAPSHOTS (--sigma-rel S | --half-life N | --window W) [--at T] --out FILE``: reconstruct an average.

Imports torch only once the arguments are parsed, so ``--help`` answers at once. Bad input (options, an
unreadable or mixed snapshot folder, a target out of range) is a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from emakit._cli_args import Parser, checked
from emakit.posthoc import POOR_FIT  # the fit error above which the result is printed with a warning

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Reconstruct, after training, an EMA of any length from the snapshots a run saved of two
or more averages (post-hoc EMA, Karras et al., EDM2). The result is a safetensors file
of the model's tensors under their canonical names.

Time is counted in EMA updates since the averages started (t in the snapshots); with
an update interval of k steps, update t happened at about step k*t."""

EPILOG = """\
examples:
  emakit posthoc runs/x/snapshots --list
  emakit posthoc runs/x/snapshots --sigma-rel 0.07 --out ema-0.07.safetensors
  emakit posthoc runs/x/snapshots --half-life 2000 --at 40000 --out ema.safetensors
  emakit posthoc runs/x/snapshots --window 0.2 --out swa-last-20pct.safetensors
  emakit posthoc runs/x/snapshots --window 8000:10000 --out swa.safetensors"""

_DTYPES = ("float32", "float16", "bfloat16")
#: --out suffixes written with torch.save; ``.safetensors`` is written with safetensors, nothing else is accepted.
_TORCH_SUFFIXES = (".pt", ".pth")
PROG = "emakit posthoc"


_SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of ``emakit posthoc``; imports no torch."""
    p = Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("snapshots", metavar="SNAPSHOTS", help="the snapshot folder a run wrote")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--sigma-rel",
        type=checked(float, lambda v: 0 < v <= _SIGMA_REL_MAX, f"a number in (0, 1/sqrt(12) = {_SIGMA_REL_MAX:.4f}]"),
        metavar="S",
        help="target: a power-function profile whose width is S times the training time (EDM2 uses 0.05-0.2)",
    )
    target.add_argument(
        "--half-life",
        type=checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number of EMA updates"),
        metavar="N",
        help="target: a classic EMA with a constant half-life of N EMA updates",
    )
    target.add_argument(
        "--window",
        type=_window,
        metavar="W",
        help="target: the equal-weight average (SWA) of the last fraction W of the updates up to --at (0.2), "
        "or of the updates after T0 up to T1 (T0:T1); exact at snapshots when sigma_rel 1/sqrt(12) is tracked",
    )
    p.add_argument(
        "--at",
        type=checked(int, lambda v: v >= 1, "an integer >= 1 (EMA updates)"),
        metavar="T",
        help="reconstruct the average as it was after T EMA updates (default: at the last snapshot)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the result here (.safetensors, or .pt/.pth for torch.save); needed unless --list",
    )
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="of the floating tensors (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the snapshots (t, step, averages) and exit")
    return p


def _window(text: str) -> float | tuple[int, int]:
    """``--window``: a fraction in (0, 1], or ``T0:T1`` in EMA updates with 0 <= T0 < T1."""
    try:
        if ":" in text:
            t0, t1 = (int(part) for part in text.split(":"))
            if 0 <= t0 < t1:
                return (t0, t1)
        else:
            fraction = float(text)
            if 0 < fraction <= 1:
                return fraction
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] or T0:T1 with 0 <= T0 < T1, got {text!r}")


def _list(folder: str) -> None:
    from emakit.posthoc.snapshots import missing_snapshot_indices, read_snapshot_index
    from emakit.posthoc.snapshots.reading import describe_indices

    index = read_snapshot_index(folder)
    first = index[0]
    print(f"{len(index)} snapshots in {folder}, update_interval {first.update_interval}, averages:")
    for j, profile in enumerate(first.profiles):
        print(f"  {j}: {profile}")
    print(f"{'snapshot':<28}{'t':>10}{'step':>12}  dtype")
    for info in index:
        print(f"{info.path.name:<28}{info.t:>10}{info.step:>12}  {info.dtype}")
    missing = missing_snapshot_indices(index)
    if missing:
        print(f"missing: {describe_indices(missing)} (deleted or lost?); a reconstruction uses the others")


def _run(args: argparse.Namespace) -> None:
    import torch

    from emakit.posthoc.reconstruction import describe, execute_plan, gap_message, plan_reconstruction, poor_fit_message

    plan = plan_reconstruction(
        args.snapshots, sigma_rel=args.sigma_rel, half_life=args.half_life, t=args.at, window=args.window
    )
    if Path(args.out).suffix in _TORCH_SUFFIXES:
        from emakit.checkpoint.files import save_checkpoint_file

        result = execute_plan(plan, dtype=getattr(torch, args.dtype))
        save_checkpoint_file(result, args.out, overwrite=True)  # atomic, like the safetensors write
    else:
        result = execute_plan(plan, out=args.out, dtype=getattr(torch, args.dtype))
    summary = describe(plan)
    averages = len(plan.latest.profiles)
    print(
        f"reconstructed {plan.target} at t={plan.t} (step {summary['step']}) from {summary['snapshots_used']} "
        f"snapshots x {averages} averages; profile fit error {100 * plan.fit_error:.3g}%"
    )
    print(f"wrote {args.out} ({len(result)} tensors, {args.dtype})")
    gap = gap_message(plan.snapshots)
    if gap:
        print(f"{PROG}: warning: {gap}", file=sys.stderr)
    if plan.fit_error > POOR_FIT:
        print(f"{PROG}: warning: {poor_fit_message(plan.fit_error)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``emakit posthoc`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a bad option (2)
        return int(e.code or 0)
    if not args.list:
        if args.sigma_rel is None and args.half_life is None and args.window is None:
            print(
                f"{parser.prog}: error: give the target: --sigma-rel S or --half-life N (or --window W)",
                file=sys.stderr,
            )
            return 2
        if args.out is None:
            print(f"{parser.prog}: error: --out FILE is needed (where to write the result)", file=sys.stderr)
            return 2
        if Path(args.out).is_dir():
            print(f"{parser.prog}: error: --out: {args.out!r} is a directory; give a file name", file=sys.stderr)
            return 2
        if Path(args.out).suffix not in (".safetensors", *_TORCH_SUFFIXES):
            print(
                f"{parser.prog}: error: --out: {args.out!r} has neither suffix '.safetensors' (written with safetensors) "
                "nor '.pt'/'.pth' (written with torch.save); name the file for the format you want",
                file=sys.stderr,
            )
            return 2
    try:
        if args.list:
            _list(args.snapshots)
        else:
            _run(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
