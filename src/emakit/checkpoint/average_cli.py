"""``emakit average CKPT [CKPT ...] --out FILE``: the (weighted) mean of several checkpoints, as one file.

Bad input (options, unreadable checkpoints, checkpoints of different models, an existing ``--out``) is a
one-line error on stderr and exit status 2. The work is :func:`emakit.checkpoint.average.average_checkpoints`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from emakit._cli_args import Parser, checked

__all__ = ["build_parser", "main"]

PROG = "emakit average"

DESCRIPTION = """\
Average the weights of several checkpoints of one model (LAWA, checkpoint averaging):
floating-point tensors are the weighted mean, accumulated in float64 and written in their
own dtype; integer and bool tensors (BatchNorm's num_batches_tracked) are copied from the
last checkpoint listed with a non-zero weight. Checkpoints, each given once: emakit .pt
files and DCP folders, Lightning .ckpt files, .safetensors files, plain torch.save
state_dicts, Transformers checkpoint folders (sharded or not). They are read a group of tensors at a time, so memory stays near one model even
for many checkpoints. The output is a state_dict under the checkpoints' own names, as
.safetensors or .pt (by --out's suffix), written to a temporary file and renamed; never
one of the inputs or inside an input folder."""

EPILOG = """\
examples:
  emakit average runs/x/checkpoints/ep8-ba800.pt runs/x/checkpoints/ep9-ba900.pt --out avg.safetensors
  emakit average ckpt-1000 ckpt-2000 ckpt-3000 --weights 1 2 3 --out avg.pt
  emakit average a.ckpt b.ckpt --which ema --out ema-avg.safetensors --force"""

_weight = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_chunk_mb = checked(int, lambda v: v > 0, "a positive integer (MiB)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of ``emakit average``."""
    p = Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or folders of one model")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write: .safetensors or .pt")
    p.add_argument(
        "--weights",
        nargs="+",
        type=_weight,
        metavar="W",
        help="one weight per checkpoint, in the same order (normalised to sum to 1; default: all equal)",
    )
    p.add_argument(
        "--which",
        choices=("training", "ema"),
        default="training",
        help="from checkpoints that hold both, the training weights or the EMA's (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out (the old file is kept as FILE.old)")
    p.add_argument(
        "--chunk-mb",
        type=_chunk_mb,
        default=64,
        metavar="MB",
        help="float64 accumulators per group of tensors, in MiB (default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``emakit average`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from emakit.checkpoint.average import average_checkpoints, normalize_weights

    try:
        normalize_weights(args.weights, len(args.checkpoints))
    except ValueError as e:
        parser.error(f"--{e}")
    try:
        result = average_checkpoints(
            args.checkpoints,
            args.out,
            weights=args.weights,
            which=args.which,
            force=args.force,
            chunk_bytes=args.chunk_mb * 2**20,
        )
    except (ValueError, OSError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; {args.out!r} was not written", file=sys.stderr)
        return 130
    print(f"{PROG}: {len(result.sources)} checkpoints ({args.which} weights) -> {result.path}")
    for path, weight in zip(result.sources, result.weights, strict=True):
        print(f"  {weight:.4f}  {path}")
    print(
        f"  {result.averaged} tensors averaged, {result.copied} integer/bool tensors from the last checkpoint "
        f"with a non-zero weight; {result.nbytes / 2**20:.1f} MiB written"
    )
    if result.moved_aside is not None:
        print(f"  the previous {result.path.name} is kept as {result.moved_aside}")
    return 0
