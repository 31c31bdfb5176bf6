"""What writing the average back costs per update next to a plain EMA, measured in one process (ratios, not asserted).

python benchmarks/writeback_cost.py [--params 4000000] [--repeats 30]

Each row times ``ema.step()`` (one update, and the write-back due at it) on the same model: a plain
``EMA(half_life='100ba')``; with ``write_back(pull=0.01)`` (a pull after every update); with
``write_back(every='1ba')`` (a copy at every step: the worst case of Switch-EMA); with ``write_back(every='100ba')``
(a copy every 100 steps, its cost spread over them); and ``every='1ba'`` with ``optimizer_state='reset'`` (Adam's
state of every parameter dropped at each copy: the search of the optimizers included). The averagers are timed in
turn, round after round, so that drifts of the machine fall on all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from emakit import EMA


def model_of(params: int, dtype: torch.dtype) -> nn.Module:
    width = 1024
    layers = max(1, params // (width * width))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(dtype)


def rows() -> dict[str, Callable[[], EMA]]:
    return {
        "EMA(half_life='100ba')": lambda: EMA(half_life="100ba"),
        "+ write_back(pull=0.01)": lambda: EMA(half_life="100ba").write_back(pull=0.01),
        "+ write_back(every='1ba')": lambda: EMA(half_life="100ba").write_back(every="1ba"),
        "+ write_back(every='100ba')": lambda: EMA(half_life="100ba").write_back(every="100ba"),
        "+ write_back(every='1ba', optimizer_state='reset')": lambda: EMA(half_life="100ba").write_back(
            every="1ba", optimizer_state="reset"
        ),
    }


def measure(params: int, repeats: int, dtype: torch.dtype) -> dict[str, float]:
    """The median seconds per ``ema.step()`` of each row, on one model of ``params`` parameters."""
    torch.manual_seed(0)
    model = model_of(params, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    averagers = {name: make() for name, make in rows().items()}
    for averager in averagers.values():
        averager.attach(model)
    samples: dict[str, list[float]] = {name: [] for name in averagers}
    for round_ in range(repeats + 1):
        for name, averager in averagers.items():
            optimizer.step()  # Adam's state exists for 'reset' to drop (untimed)
            start = time.perf_counter()
            averager.step()
            if round_:  # the first round makes the storages and update plans
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        times = measure(args.params, args.repeats, dtype)
        reference = times["EMA(half_life='100ba')"]
        numel = sum(p.numel() for p in model_of(args.params, dtype).parameters())
        shown = str(dtype).removeprefix("torch.")
        print(f"{numel:,} {shown} parameters (fp32 average), median of {args.repeats}, threads {torch.get_num_threads()}")
        for name, seconds in times.items():
            print(f"  {name:52s} {seconds * 1e3:8.2f} ms   x{seconds / reference:5.2f} of a plain EMA update")


if __name__ == "__main__":
    main()
