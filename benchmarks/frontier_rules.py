"""What each frontier rule costs per update next to a plain EMA, measured in one process (ratios, not asserted).

python benchmarks/frontier_rules.py [--params 4000000] [--repeats 30]

The rows and their timing are :mod:`emakit.bench.rules` (``emakit bench`` prints them with the write-back rows):
``EMA(half_life='100ba')`` (the reference), ``EMA(half_life_fraction=0.05)``, ``EMA(half_life='4096tok')``,
``BEMA(update_interval='1ba')`` and BEMA's evaluation. Also BEMA's ``theta_0`` memory per parameter.
"""

from __future__ import annotations

import argparse

import torch

from emakit.bench.rules import REFERENCE, measure, model_of, rule_rows, theta0_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    times = measure(rule_rows(), args.params, args.repeats)
    numel = sum(p.numel() for p in model_of(args.params).parameters())
    print(f"{numel:,} fp32 parameters, median of {args.repeats}, CPU threads {torch.get_num_threads()}")
    for name, seconds in times.items():
        print(f"  {name:46s} {seconds * 1e3:8.2f} ms   x{seconds / times[REFERENCE]:5.2f} of a plain EMA update")
    for dtype in (torch.float32, torch.bfloat16):
        shown = str(dtype).removeprefix("torch.")
        print(f"  BEMA theta_0 for a {shown} model: {theta0_bytes(args.params, dtype):.3f} bytes per parameter")


if __name__ == "__main__":
    main()
