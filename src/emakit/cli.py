"""The ``emakit`` command: ``emakit demo`` (train, compare raw vs EMA weights) and ``emakit bench``.

``emakit --help``, ``--version``, ``emakit demo --help`` and argument errors answer without importing
torch (the parser reads the demo's defaults from the torch-free :mod:`emakit.demo.config`); torch, the
demo's optional packages (scikit-learn, matplotlib, safetensors) and the benchmarks are imported only by
the subcommand that runs. A missing one is a one-line error, not a traceback.

Subcommands other than ``demo`` hand the rest of the command line to a module's ``main(argv)`` and
parse it themselves: each is one entry of ``_DELEGATED`` (``emakit bench`` -> ``emakit.bench.main``),
and the module is imported only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emakit._cli_args import Parser, checked
from emakit._version import __version__
from emakit.demo.config import RUN_FILES, DemoConfig, OptionError, check_time_option
from emakit.time import TimeUnit

__all__ = ["build_parser", "main"]

#: Subcommands whose module's ``main(argv: list[str]) -> int`` gets the rest of the command line:
#: name -> (module, one-line help for ``emakit --help``). The module is imported only when it runs.
_DELEGATED: dict[str, tuple[str, str]] = {
    "bench": ("emakit.bench", "run emakit's benchmarks (emakit bench --help for their options)"),
    "posthoc": ("emakit.posthoc.cli", "reconstruct an EMA of any length from a snapshot folder (post-hoc EMA)"),
    "posthoc-demo": ("emakit.demo.posthoc", "the digits demo with post-hoc EMA: sweep the EMA length after training"),
    "average": ("emakit.checkpoint.average_cli", "average the weights of several checkpoints into one file (LAWA)"),
}

DEMO_DESCRIPTION = """\
Train a small CNN (two conv+BatchNorm blocks, ~10k parameters) on scikit-learn's
digits (1,797 8x8 images, bundled; a fixed, stratified 80/20 train/validation split)
with emakit's Trainer and EMA, and show what the EMA does to validation metrics.
Every --eval-interval batches both the EMA weights and the raw training weights are
evaluated on the validation split, in the same run.

The defaults make training deliberately noisy (plain SGD at a high learning rate on
batches of 16), so the raw validation curve jumps between evaluations while the EMA
curve stays smooth; they take 10-20 seconds on 2 CPU cores. At the end a table gives
final and best validation accuracy for raw and EMA weights and a noise figure for
each curve: the standard deviation of the change in validation accuracy between
successive evaluations over the second half of training, in percentage points.

Files written to runs/<timestamp>/ (or runs/NAME with --name, or DIR with --out):
  metrics.jsonl     one JSON record per evaluation: batch, epoch (fractional),
                    samples, train_loss, raw_loss, raw_accuracy, ema_loss,
                    ema_accuracy, ema_started (false before the EMA starts; the
                    EMA numbers then repeat the raw weights')
  curves.png        raw vs EMA validation accuracy and loss against batches
                    (not with --no-plot)
  checkpoints/      ep{E}-ba{B}.pt and latest.pt: the final emakit checkpoint,
                    written by the Trainer's CheckpointSaver, with the EMA weights
                    as the model's weights and the training weights, optimizer
                    and RNG state beside them (a run can resume from it)
  ema_weights.safetensors
                    the EMA weights alone under the model's state_dict names,
                    for inference: model = emakit.demo.build_model(...), then
                    model.load_state_dict(safetensors.torch.load_file(...))
  summary.json      the settings and the numbers of the final table
"""

DEMO_EPILOG = """\
Times are <number><unit>: 'ba' batches, 'ep' epochs; --ema-start also takes 'sp'
samples and 'dur', a fraction of the run. Examples:
  emakit demo                                   the defaults
  emakit demo --half-life 50ba --name slow-ema  a longer memory, in runs/slow-ema/
  emakit demo --data mine.npz --epochs 20       your own arrays x and y
"""


_positive_int = checked(int, lambda v: v > 0, "a positive integer")
_non_negative_int = checked(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


_clock = time.perf_counter  # the command's wall clock; a test replaces it


def _run_name(text: str) -> str:
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"must be a plain folder name (no '/'), got {text!r}")
    return text


def _time_option(option: str, units: tuple[TimeUnit, ...], *, allow_zero: bool = False) -> Callable[[str], str]:
    """An argparse ``type`` that checks a time option without torch and keeps the text for DemoConfig."""

    def parse(text: str) -> str:
        try:
            check_time_option(text, option, units, allow_zero=allow_zero)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{option}: ")) from None
        return text

    return parse


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig(out=Path("."))
    update_units = (TimeUnit.BATCH, TimeUnit.EPOCH)
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=d.epochs, help="epochs to train (default: %(default)s)")
    train.add_argument(
        "--lr", type=_positive_float, default=d.lr, help="SGD learning rate, no momentum (default: %(default)s)"
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="training batch size, at least 2; the last partial batch of an epoch is dropped (default: %(default)s)",
    )
    train.add_argument(
        "--eval-interval",
        type=_positive_int,
        default=d.eval_interval,
        metavar="N",
        help="evaluate raw and EMA weights every N batches, and after the last batch (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=_non_negative_int,
        default=d.seed,
        help="seeds the model's initialisation and the shuffling; the validation split is fixed (default: %(default)s)",
    )
    train.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda (default: %(default)s)")
    train.add_argument(
        "--threads",
        type=_positive_int,
        default=d.threads,
        help="torch CPU threads; the model is tiny, and one thread is fastest and steadiest (default: %(default)s)",
    )
    ema = p.add_argument_group("EMA")
    ema.add_argument(
        "--half-life",
        type=_time_option("--half-life", update_units),
        default=d.half_life,
        metavar="TIME",
        help="time for a weight's contribution to the average to halve, in 'ba' or 'ep' (default: %(default)s; "
        "the default run is 445 batches)",
    )
    ema.add_argument(
        "--update-interval",
        type=_time_option("--update-interval", update_units),
        default=d.update_interval,
        metavar="TIME",
        help="time between EMA updates, in --half-life's unit (default: 1 of that unit)",
    )
    ema.add_argument(
        "--ema-start",
        type=_time_option("--ema-start", tuple(TimeUnit), allow_zero=True),
        default=d.ema_start,
        metavar="TIME",
        help="when the EMA starts as a copy of the weights; before it, the EMA numbers repeat the raw ones "
        "(default: %(default)s, the first batch)",
    )
    io = p.add_argument_group("data and output")
    io.add_argument(
        "--data",
        metavar="PATH",
        help="a .npz with arrays x (images (N,H,W) or (N,C,H,W), or features (N,F)) and y (N class labels) "
        "instead of the digits; split 80/20 per class, standardised with the training split's statistics",
    )
    where = io.add_mutually_exclusive_group()
    where.add_argument("--name", type=_run_name, help="write to runs/NAME/ (default: runs/<YYYYmmdd-HHMMSS>/)")
    where.add_argument("--out", metavar="DIR", help="write to DIR instead of runs/")
    io.add_argument("--no-plot", action="store_true", help="skip curves.png (and importing matplotlib)")
    p.add_argument(
        "--posthoc",
        action="store_true",
        help="run the post-hoc EMA demo instead: snapshots during training, then a sweep of EMA lengths "
        "afterwards (the same as `emakit posthoc-demo`; its options: emakit posthoc-demo --help)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``emakit`` parser with its ``demo`` subcommand and the delegated ones (``bench``); imports no torch."""
    parser = Parser(prog="emakit", description="emakit: exponential moving averages of PyTorch model weights.")
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    metavar = "{" + ",".join(["demo", *_DELEGATED]) + "}"
    sub = parser.add_subparsers(dest="command", metavar=metavar, parser_class=Parser)
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on digits and compare raw vs EMA validation curves",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_demo_arguments(demo)
    for name, (_, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; run by _delegate
    return parser


def _join_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn ``--half-life -5ba`` into ``--half-life=-5ba`` so a negative value reaches its check.

    argparse otherwise reads ``-5ba`` as an unknown option and reports "expected one argument".
    """
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    known = {s for a in parser._actions for s in a.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in known:
            out.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def _demo_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["demo"]
    raise RuntimeError("the demo subcommand is missing")


def _run_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    if args.out is not None:
        option, out = "--out", Path(args.out)
    elif args.name is not None:
        option, out = "--name", Path("runs") / args.name
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        option, out = "--name", Path("runs") / stamp
        n = 1
        while out.exists():
            n += 1
            out = Path("runs") / f"{stamp}-{n}"
    if out.exists() and not out.is_dir():
        parser.error(f"{option}: {str(out)!r} exists and is not a folder")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held:
        parser.error(f"{option}: {str(out)!r} already holds a run ({', '.join(held)}); choose another or delete it")
    problem = _cannot_create(out)
    if problem is not None:
        parser.error(f"{option}: cannot create the folder {str(out)!r}: {problem}")
    return out


def _cannot_create(folder: Path) -> str | None:
    """Why ``folder`` cannot be created and written to, or None; the folders made to find out are removed.

    An existing file at ``folder`` is left to the demos' own check ("exists and is not a folder").
    """
    if folder.exists() and not folder.is_dir():
        return None
    created: list[Path] = []
    try:
        for parent in reversed([folder, *folder.parents]):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe.", suffix=".tmp"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    finally:
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()
    return None


def _option_value(argv: list[str], option: str) -> str | None:
    """The value of ``option`` (``--out DIR`` or ``--out=DIR``) in ``argv``, the last one given; None if absent."""
    value = None
    for i, token in enumerate(argv):
        if token == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(option + "="):
            value = token[len(option) + 1 :]
    return value


def _check_packages(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    needed = {"safetensors": "safetensors"}
    if args.data is None:
        needed["sklearn"] = "scikit-learn"
    if not args.no_plot:
        needed["matplotlib"] = "matplotlib"
    missing = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        parser.error(f"needs {', '.join(missing)}: install the demo extras with pip install -e '.[demo]'")


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _fmt_num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _print_table(summary: dict[str, Any]) -> None:
    raw, ema = summary.get("raw") or {}, summary.get("ema") or {}

    def row(label: str, a: str, b: str) -> None:
        print(f"  {label:<30}{a:>14}{b:>14}")

    print()
    row("validation", "raw weights", "EMA weights")
    row("final accuracy", _fmt_pct(raw.get("final_accuracy")), _fmt_pct(ema.get("final_accuracy")))
    row(
        "best accuracy (at batch)",
        f"{_fmt_pct(raw.get('best_accuracy'))} ({raw.get('best_batch', '-')})",
        f"{_fmt_pct(ema.get('best_accuracy'))} ({ema.get('best_batch', '-')})",
    )
    row("final loss", _fmt_num(raw.get("final_loss")), _fmt_num(ema.get("final_loss")))
    row("noise, 2nd half (pp)", _fmt_num(raw.get("noise_pp"), 2), _fmt_num(ema.get("noise_pp"), 2))
    print(
        "  noise: std of the change in validation accuracy between successive evaluations over the second half\n"
        "  of training, in percentage points (lower is steadier)."
    )
    raw_noise, ema_noise = raw.get("noise_pp"), ema.get("noise_pp")
    if raw_noise is not None and ema_noise is not None and ema_noise > 0:
        print(f"  The EMA curve is {raw_noise / ema_noise:.1f}x less noisy than the raw one.")
    elif not ema:
        print("  The EMA did not start before the end of training.")
    if summary.get("non_finite_evaluations"):
        print("  Training diverged (non-finite losses); try a smaller --lr.")


def _demo(argv: list[str], parser: argparse.ArgumentParser, started: float) -> int:
    demo_parser = _demo_parser(parser)
    args = demo_parser.parse_args(_join_dash_values(argv, demo_parser))
    _check_packages(args, demo_parser)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 prints and keeps the files
    if rank == 0:
        out = _run_dir(args, demo_parser)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"emakit-demo-rank{rank}-"))
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this worker process)

    # The run's own names: the same classes as emakit.demo.config's once demo/run.py imports them from there.
    from emakit.demo.run import DemoConfig, OptionError, prepare, run_demo
    from emakit.engine.naming import unwrap_model

    config = DemoConfig(
        out=out,
        epochs=args.epochs,
        half_life=args.half_life,
        update_interval=args.update_interval,
        ema_start=args.ema_start,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_interval=args.eval_interval,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        data=args.data,
        plot=not args.no_plot and rank == 0,
        progress=rank == 0,
    )
    try:
        data, ema = prepare(config)
    except OptionError as e:
        demo_parser.error(str(e))
    shape = "x".join(str(s) for s in data.input_shape)
    n_train, n_val = len(data.y_train), len(data.y_val)
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    if world > 1:  # each rank reads its share of every epoch (the sampler pads it to a multiple of the ranks)
        per_rank = (math.ceil(n_train / world) // config.batch_size) * config.epochs
        schedule = (
            f"batch {config.batch_size} per rank x {world} ranks = {config.batch_size * world} per step, "
            f"{epochs} = {per_rank} steps (each rank runs {per_rank} batches, {per_rank * world} in all)"
        )
    else:
        schedule = f"batch {config.batch_size}, {epochs} = {(n_train // config.batch_size) * config.epochs} batches"
    print(
        f"emakit demo: {data.source}, {n_train} train / {n_val} validation samples of shape {shape}, "
        f"{data.num_classes} classes\n"
        f"  SGD lr={config.lr:g}, {schedule}, seed {config.seed}; "
        f"{ema!r}\n"
        f"  evaluating raw and EMA weights every {config.eval_interval} batches; writing to {out}/",
        flush=True,
    )
    result = run_demo(config, data, ema)
    if rank != 0:
        shutil.rmtree(out, ignore_errors=True)
        return 0
    _print_table(result.summary)
    params = sum(p.numel() for p in result.trainer.state.model.parameters())
    model_class = type(unwrap_model(result.trainer.state.model)).__name__  # not the DDP/FSDP wrapper's name
    print(f"\n  model: {model_class}, {params:,} parameters")
    print("  files:")
    for key in ("metrics", "curves", "checkpoint", "ema_weights", "summary"):
        if key in result.files:
            print(f"    {result.files[key]}")
    wall = _clock() - started
    print(
        f"\nwall time: {wall:.1f} s since the command started, loading torch included (of which training, "
        f"evaluating and writing files: {result.wall_time_s:.1f} s)"
    )
    return 0


def _delegate(name: str, argv: list[str]) -> int:
    """Run ``emakit <name> ...`` by importing its module (only now) and calling its ``main(argv)``."""
    module_name = _DELEGATED[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"emakit {name}: error: {module_name} cannot be imported ({e})", file=sys.stderr)
        return 2
    return int(module.main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emakit`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    started = _clock()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"] and "--posthoc" in args[1:]:  # `emakit demo --posthoc` is the post-hoc demo
        out = _option_value(args[1:], "--out")
        problem = None if out is None else _cannot_create(Path(out))
        if problem is not None:
            print(f"emakit demo --posthoc: error: --out: cannot create the folder {out!r}: {problem}", file=sys.stderr)
            return 2
        return _delegate("posthoc-demo", args[1:])
    if args and args[0] in _DELEGATED:
        return _delegate(args[0], args[1:])
    parser = build_parser()
    if not args:
        parser.print_help(sys.stderr)
        return 2
    if args[0] != "demo":
        parser.parse_args(args)  # --help and --version exit 0 here; anything else is an error (exit 2)
        parser.print_help(sys.stderr)
        return 2
    try:
        return _demo(args[1:], parser, started)
    except KeyboardInterrupt:
        print("\nemakit demo: interrupted", file=sys.stderr)
        return 130
