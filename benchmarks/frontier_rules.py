"""What each frontier rule costs per update next to a plain EMA, measured in one process (ratios, not asserted).

python benchmarks/frontier_rules.py [--params 4000000] [--repeats 30]

Rules: ``EMA(half_life='100ba')`` (the reference), ``EMA(half_life_fraction=0.05)``, ``EMA(half_life='4096tok')``,
``BEMA(update_interval='1ba')`` (one blend per step) and BEMA's evaluation (writing the corrected weights,
what each swap, ``ema_model`` read or export costs). Also BEMA's ``theta_0`` memory per parameter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from emakit import BEMA, EMA
from emakit.averaging import Averager


def model_of(params: int, dtype: torch.dtype) -> nn.Module:
    width = 1024
    layers = max(1, params // (width * width))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(dtype)


def timed(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: storages and update plans are made here
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    rules: dict[str, Callable[[], Averager]] = {
        "EMA(half_life='100ba')": lambda: EMA(half_life="100ba"),
        "EMA(half_life_fraction=0.05)": lambda: EMA(half_life_fraction=0.05),
        "EMA(half_life='4096tok')": lambda: EMA(half_life="4096tok"),
        "BEMA(update_interval='1ba')": lambda: BEMA(update_interval="1ba"),
    }
    model = model_of(args.params, torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    times: dict[str, float] = {}
    for name, make in rules.items():
        averager = make()
        averager.attach(model)
        times[name] = timed(lambda a=averager: a.step(num_samples=8, num_tokens=1024), args.repeats)
    bema = BEMA(update_interval="1ba")
    bema.attach(model)
    bema.step()
    times["BEMA evaluation (corrected weights written)"] = timed(lambda: bema.ema_tensors, args.repeats)
    reference = times["EMA(half_life='100ba')"]
    print(f"{numel:,} fp32 parameters, median of {args.repeats}, CPU threads {torch.get_num_threads()}")
    for name, seconds in times.items():
        print(f"  {name:46s} {seconds * 1e3:8.2f} ms   x{seconds / reference:5.2f} of a plain EMA update")
    for dtype in (torch.float32, torch.bfloat16):
        typed = model_of(args.params, dtype)
        b = BEMA(update_interval="1ba")
        b.attach(typed)
        b.step()
        assert b._rule.correction is not None
        per = b._rule.correction.nbytes / sum(p.numel() for p in typed.parameters())
        print(f"  BEMA theta_0 for a {str(dtype).removeprefix('torch.')} model: {per:.3f} bytes per parameter")


if __name__ == "__main__":
    main()
