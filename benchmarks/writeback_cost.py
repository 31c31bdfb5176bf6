"""What writing the average back costs per update next to a plain EMA, measured in one process (ratios, not asserted).

python benchmarks/writeback_cost.py [--params 4000000] [--repeats 30]

The rows and their timing are :mod:`emakit.bench.rules` (``emakit bench`` prints them with the rules' rows):
``ema.step()`` of a plain ``EMA(half_life='100ba')``; with ``write_back(pull=0.01)``; with
``write_back(every='1ba')`` (a copy at every step: Switch-EMA's worst case, a copy every N steps adds 1/N of its
extra); and ``every='1ba'`` with ``optimizer_state='reset'``. For an fp32 and a bf16 model (fp32 average).
"""

from __future__ import annotations

import argparse

import torch

from emakit.bench.rules import REFERENCE, measure, model_of, writeback_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        times = measure(writeback_rows(), args.params, args.repeats, dtype)
        numel = sum(p.numel() for p in model_of(args.params, dtype).parameters())
        shown = str(dtype).removeprefix("torch.")
        print(
            f"{numel:,} {shown} parameters (fp32 average), median of {args.repeats}, threads {torch.get_num_threads()}"
        )
        for name, seconds in times.items():
            print(f"  {name:52s} {seconds * 1e3:8.2f} ms   x{seconds / times[REFERENCE]:5.2f} of a plain EMA update")


if __name__ == "__main__":
    main()
