"""``emakit posthoc SNAPSHOTS (--sigma-rel S | --half-life N | --window W | --kernel K) [--at T] --out FILE``: reconstruct
an average; ``--list-kernels`` lists the named kernels.

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
  emakit posthoc runs/x/snapshots --window 8000:10000 --out swa.safetensors
  emakit posthoc runs/x/snapshots --kernel cosine:0.2 --out merged.safetensors
  emakit posthoc runs/x/snapshots --kernel bema:10,1,0.5,0.2 --out bema.safetensors   (raw snapshots)
  emakit posthoc --list-kernels
  emakit posthoc runs/x/snapshots --metric my_eval:loss --candidates tracked power:0.03 power:0.15
      cosine:0.1 cosine:0.2 uniform:0.2 window:8000:10000 raw --table sweep/ --out best.safetensors

choose by a metric (--metric): each candidate is reconstructed in turn and passed, as a dict of
tensors by name, to FUNCTION of MODULE (importable from here, or path/to/file.py), which returns
a number or a dict of numbers (--select names the one to choose by); the lowest wins unless
--maximize. --table DIR gets sweep.csv, sweep.json and sweep.png; --out gets the best."""

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
    p.add_argument("snapshots", metavar="SNAPSHOTS", nargs="?", help="the snapshot folder a run wrote")
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
    target.add_argument(
        "--kernel",
        type=_kernel,
        metavar="NAME:VALUE",
        help="target: any kernel over the updates, e.g. cosine:0.2 (WSM's merge emulating a cosine decay over the "
        "last 20%%); --list-kernels names them all",
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
    p.add_argument("--force", action="store_true", help="replace --out if it exists (never a snapshot)")
    p.add_argument("--list", action="store_true", help="list the snapshots (t, step, averages) and exit")
    p.add_argument("--list-kernels", action="store_true", help="list the named kernels of --kernel and exit")
    choose = p.add_argument_group("choose by a metric")
    choose.add_argument("--metric", metavar="MODULE:FUNCTION", help="evaluate each candidate with this function")
    choose.add_argument(
        "--candidates",
        nargs="+",
        metavar="NAME:VALUE",
        help="targets to compare: NAME:VALUE, 'tracked', 'raw', 'window:T0:T1'",
    )
    choose.add_argument("--select", metavar="NAME", help="the number (of those FUNCTION returns) to choose by")
    choose.add_argument("--maximize", action="store_true", help="the highest value wins (default: the lowest)")
    choose.add_argument("--table", metavar="DIR", help="write sweep.csv, sweep.json and sweep.png here")
    return p


def _kernel(text: str) -> dict[str, object]:
    """``--kernel``: ``NAME:VALUE`` (see ``--list-kernels``), as plan_reconstruction's target arguments."""
    from emakit.posthoc.targets import parse_kernel  # numpy only

    try:
        return parse_kernel(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kernel_list() -> str:
    from emakit.posthoc.targets import KERNELS, kernel_spec

    lines = ["named kernels of --kernel NAME:VALUE:"]
    lines += [f"  {kernel_spec(name):<10}  {what}" for name, (_, what) in KERNELS.items()]
    return "\n".join(lines)


#: Options that take a value which may start with '-' (a bad value such as --window -10:20 is then reported by its
#: own check, not as argparse's "expected one argument").
_VALUE_OPTIONS = ("--sigma-rel", "--half-life", "--window", "--kernel", "--at")


def _join_dashed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


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
        held = " + raw weights" * info.raw + " + theta_0" * info.start
        print(f"{info.path.name:<28}{info.t:>10}{info.step:>12}  {info.dtype}{held}")
    missing = missing_snapshot_indices(index)
    if missing:
        print(f"missing: {describe_indices(missing)} (deleted or lost?); a reconstruction uses the others")


def _run(args: argparse.Namespace) -> None:
    import torch

    from emakit.posthoc.reconstruction import (
        check_output,
        describe,
        execute_plan,
        gap_message,
        plan_reconstruction,
        poor_fit_message,
    )

    targets = args.kernel or {"sigma_rel": args.sigma_rel, "half_life": args.half_life, "window": args.window}
    plan = plan_reconstruction(args.snapshots, t=args.at, **targets)
    try:
        check_output(plan, args.out, overwrite=args.force)
    except FileExistsError:
        raise FileExistsError(
            f"--out: {args.out!r} exists; pass --force to replace it, or choose another name"
        ) from None
    except ValueError:
        raise ValueError(
            f"--out: {args.out!r} is inside the snapshot folder {args.snapshots!r}, where it would replace or pose as "
            "a snapshot; write the result somewhere else"
        ) from None
    if Path(args.out).suffix in _TORCH_SUFFIXES:
        from emakit.checkpoint.files import save_checkpoint_file

        result = execute_plan(plan, dtype=getattr(torch, args.dtype))
        save_checkpoint_file(result, args.out, overwrite=args.force)  # atomic, like the safetensors write
    else:
        result = execute_plan(plan, out=args.out, dtype=getattr(torch, args.dtype), overwrite=args.force)
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


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the options (beyond each option's own check), or None."""
    targets = [args.sigma_rel, args.half_life, args.window, args.kernel]
    if args.list:
        return None
    if args.metric is not None:
        if any(v is not None for v in targets):
            return "--metric compares --candidates; leave out --sigma-rel, --half-life, --window and --kernel"
        if not args.candidates:
            return "--metric needs --candidates NAME:VALUE ... (or 'tracked'); --list-kernels names them"
        if args.out is not None and Path(args.out).suffix != ".safetensors":
            return f"--out: {args.out!r}: the best candidate is written as a .safetensors file; name it so"
        return None
    if args.candidates or args.table or args.select or args.maximize:
        return "--candidates, --table, --select and --maximize go with --metric MODULE:FUNCTION"
    if all(v is None for v in targets):
        return "give the target: --sigma-rel S, --half-life N, --window W or --kernel NAME:VALUE"
    if args.out is None:
        return "--out FILE is needed (where to write the result)"
    if Path(args.out).is_dir():
        return f"--out: {args.out!r} is a directory; give a file name"
    if Path(args.out).suffix not in (".safetensors", *_TORCH_SUFFIXES):
        return (
            f"--out: {args.out!r} has neither suffix '.safetensors' (written with safetensors) "
            "nor '.pt'/'.pth' (written with torch.save); name the file for the format you want"
        )
    return None


def _choose(args: argparse.Namespace) -> None:
    from emakit.posthoc.sweep import check_candidate, load_metric, sweep

    for spec in args.candidates:
        try:
            check_candidate(spec)
        except ValueError as e:
            raise ValueError(f"--candidates: {e}") from None
    evaluate = load_metric(args.metric)
    result = sweep(
        args.snapshots,
        evaluate,
        args.candidates,
        t=args.at,
        metric=args.select,
        goal="max" if args.maximize else "min",
        out=args.table,
        export=args.out,
        overwrite=args.force,
    )
    print(f"{'candidate':<28}{result.metric:>14}{'fit error':>12}")
    for row in result.rows:
        mark = "  best" if row is result.best else ""
        print(f"{row['candidate']:<28}{row[result.metric]:>14.6g}{100 * row['fit_error']:>11.3g}%{mark}")
    for path in result.files.values():
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``emakit posthoc`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(_join_dashed_values(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as e:  # --help (0) or a bad option (2)
        return int(e.code or 0)
    if args.list_kernels:
        print(_kernel_list())
        return 0
    if args.snapshots is None:
        print(f"{parser.prog}: error: the SNAPSHOTS folder is needed (unless --list-kernels)", file=sys.stderr)
        return 2
    problem = _check(args)
    if problem:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return 2
    from emakit.posthoc.sweep import SweepError

    try:
        if args.list:
            _list(args.snapshots)
        elif args.metric is not None:
            _choose(args)
        else:
            _run(args)
    except SweepError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
