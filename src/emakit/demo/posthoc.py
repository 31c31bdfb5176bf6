"""``emakit demo --posthoc``: choose the EMA length after training, on the digits demo.

The run trains the demo's model exactly as ``emakit demo`` does (same data, split, model, SGD settings and
seed, through emakit's :class:`~emakit.Trainer`), but its EMA tracks two power-function profiles,
``sigma_rel`` 0.05 and 0.10 (EDM2's post-hoc EMA), and writes both to ``<out>/snapshots/`` about 30 times
over the run. After training it rebuilds the average of every ``sigma_rel`` of a sweep from those snapshots
(:mod:`emakit.posthoc`), evaluates each on the validation split, and writes:

- ``posthoc.json``: every ``sigma_rel`` with its validation accuracy, loss and profile fit error; the two
  tracked averages evaluated directly; the best one; the number of snapshots; and the reconstruction check
  (the tracked profiles rebuilt at the last snapshot against the tracked averages' final values, relative
  to the distance between the two);
- ``posthoc.png``: accuracy and loss against ``sigma_rel`` (log axis), the tracked and the best marked.

:func:`main`, the command line (``emakit demo --posthoc --help``), lives here; :mod:`~emakit.demo.posthoc_config`
holds the settings, :mod:`~emakit.demo.posthoc_sweep` the run (:func:`run_posthoc_demo`) and
:mod:`~emakit.demo.posthoc_report` the plot and the table, all importable from here. Torch, matplotlib and the
training code are imported when a run starts, not when this module is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from emakit.demo.config import DemoConfig, OptionError
from emakit.demo.posthoc_config import (
    CHECK_TOLERANCE,
    PLOT_FILE,
    POOR_FIT,
    SNAPSHOT_DIR,
    SUMMARY_FILE,
    TARGET_SNAPSHOTS,
    TRACKED_SIGMA_REL,
    PosthocDemoConfig,
    check_config,
    default_sweep,
)
from emakit.demo.posthoc_report import format_table, plot_sweep
from emakit.demo.posthoc_sweep import run_posthoc_demo

__all__ = [
    "CHECK_TOLERANCE",
    "PLOT_FILE",
    "POOR_FIT",
    "SNAPSHOT_DIR",
    "SUMMARY_FILE",
    "TARGET_SNAPSHOTS",
    "TRACKED_SIGMA_REL",
    "PosthocDemoConfig",
    "build_parser",
    "default_sweep",
    "format_table",
    "main",
    "plot_sweep",
    "run_posthoc_demo",
]

PROG = "emakit demo --posthoc"
_DEMO = DemoConfig(out=Path("."))


class _Parser(argparse.ArgumentParser):
    """Errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def _int_option(minimum: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


DESCRIPTION = f"""\
Post-hoc EMA on the digits demo: train the demo's CNN as `emakit demo` does (same data,
model, SGD settings and seed) with an EMA that tracks two power-function averages,
sigma_rel {TRACKED_SIGMA_REL[0]:g} and {TRACKED_SIGMA_REL[1]:g}, and writes about {TARGET_SNAPSHOTS} snapshots of both. Then rebuild
the average of {len(default_sweep())} sigma_rel values from 0.02 to 0.25 from the snapshots, evaluate
each on the validation split, and print and plot accuracy against sigma_rel.

Files written to runs/posthoc-<timestamp>/ (or DIR with --out):
  snapshots/        snapshot-000000.safetensors, ...: both averages every few batches
                    (emakit posthoc snapshots/ --sigma-rel S --out FILE rebuilds any one)
  posthoc.json      every sigma_rel with its accuracy, loss and fit error; the tracked
                    averages evaluated directly; the best; the reconstruction check
  posthoc.png       accuracy and loss against sigma_rel (not with --no-plot)"""


def build_parser() -> argparse.ArgumentParser:
    """The post-hoc demo's command line; imports no torch."""
    p = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--posthoc", action="store_true", help=argparse.SUPPRESS)  # `emakit demo --posthoc` passes it on
    p.add_argument(
        "--epochs",
        type=_int_option(1, "a positive integer"),
        default=_DEMO.epochs,
        help="epochs to train (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_int_option(0, "a non-negative integer"),
        default=_DEMO.seed,
        help="seeds the model's initialisation and the shuffling (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_int_option(1, "a positive integer"),
        default=_DEMO.threads,
        help="torch CPU threads; one is fastest for this tiny model (default: %(default)s)",
    )
    p.add_argument("--out", metavar="DIR", help="write to DIR (default: runs/posthoc-<YYYYmmdd-HHMMSS>/)")
    p.add_argument("--no-plot", action="store_true", help="skip posthoc.png (and importing matplotlib)")
    return p


def _default_out() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = Path("runs") / f"posthoc-{stamp}", 1
    while out.exists():
        n += 1
        out = Path("runs") / f"posthoc-{stamp}-{n}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the post-hoc demo with ``argv`` (default: ``sys.argv[1:]``); return the exit status (2: bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a bad option (2), already reported
        return int(e.code or 0)
    needed = {"safetensors": "safetensors", "sklearn": "scikit-learn"}
    if not args.no_plot:
        needed["matplotlib"] = "matplotlib"
    missing = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"{PROG}: error: needs {', '.join(missing)}: pip install -e '.[demo]'", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out is not None else _default_out()
    config = PosthocDemoConfig(out=out, epochs=args.epochs, seed=args.seed, threads=args.threads, plot=not args.no_plot)
    try:
        check_config(config)
    except OptionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{PROG}: digits, {config.epochs} epoch{'s' if config.epochs != 1 else ''}, seed {config.seed}; EMA with "
        f"sigma_rel {list(TRACKED_SIGMA_REL)}, about {config.snapshots} snapshots; writing to {out}/",
        flush=True,
    )
    try:
        summary = run_posthoc_demo(config)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    print()
    print(format_table(summary))
    print("  files:")
    for path in summary["files"].values():
        print(f"    {path}")
    seconds = summary["seconds"]
    print(
        f"\n  {seconds['total']:.1f} s (training {seconds['train']:.1f} s, rebuilding and evaluating {seconds['sweep']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
