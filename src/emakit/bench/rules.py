"""What each averaging rule and each write-back costs per update next to a plain EMA, measured in one process.

Rows (each timed on the same model, round after round in turn, so that drifts of the machine fall on all alike):
a plain ``EMA(half_life='100ba')`` (the reference), ``EMA(half_life_fraction=0.05)``, ``EMA(half_life='4096tok')``,
``BEMA(update_interval='1ba')`` (one blend per step) and BEMA's evaluation (writing the corrected weights: what
each swap, ``ema_model`` read or export costs), then the plain EMA with ``write_back(pull=0.01)`` (a pull after
every update), ``write_back(every='1ba')`` (a copy at every step, Switch-EMA's worst case: a copy every N steps
adds 1/N of its extra cost) and the same with ``optimizer_state='reset'`` (Adam's state dropped at each copy, the
search of the optimizers included). An untimed Adam step comes before each timed call, so the weights move and
'reset' has state to drop. Used by ``emakit bench`` and ``benchmarks/frontier_rules.py``/``writeback_cost.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from emakit.averaging import Averager
from emakit.averaging.bema import BEMA
from emakit.averaging.ema import EMA
from emakit.bench.report import Table
from emakit.bench.sections import QUICK
from emakit.bench.timing import Clock

__all__ = ["REFERENCE", "Row", "bench_rules", "measure", "model_of", "rule_rows", "theta0_bytes", "writeback_rows"]

#: A row: given the model, the function timed once per round (it may attach an averager first).
Row = Callable[[nn.Module], Callable[[], object]]
REFERENCE = "EMA(half_life='100ba')"


def model_of(params: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Square ``Linear`` layers of width up to 1024 holding about ``params`` parameters."""
    width = max(8, min(1024, int(params**0.5)))
    layers = max(1, params // (width * width))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(dtype)


def _stepping(make: Callable[[], Averager]) -> Row:
    def row(model: nn.Module) -> Callable[[], object]:
        averager = make()
        averager.attach(model)
        return lambda: averager.step(num_samples=8, num_tokens=1024)

    return row


def _bema_evaluation(model: nn.Module) -> Callable[[], object]:
    bema = BEMA(update_interval="1ba")
    bema.attach(model)
    bema.step()
    return lambda: bema.ema_tensors


def rule_rows() -> dict[str, Row]:
    """The plain EMA and each rule: a step each, and BEMA's evaluation."""
    return {
        REFERENCE: _stepping(lambda: EMA(half_life="100ba")),
        "EMA(half_life_fraction=0.05)": _stepping(lambda: EMA(half_life_fraction=0.05)),
        "EMA(half_life='4096tok')": _stepping(lambda: EMA(half_life="4096tok")),
        "BEMA(update_interval='1ba')": _stepping(lambda: BEMA(update_interval="1ba")),
        "BEMA evaluation (corrected weights written)": _bema_evaluation,
    }


def writeback_rows() -> dict[str, Row]:
    """The plain EMA, and the plain EMA writing back."""
    return {
        REFERENCE: _stepping(lambda: EMA(half_life="100ba")),
        "+ write_back(pull=0.01)": _stepping(lambda: EMA(half_life="100ba").write_back(pull=0.01)),
        "+ write_back(every='1ba')": _stepping(lambda: EMA(half_life="100ba").write_back(every="1ba")),
        "+ write_back(every='1ba', optimizer_state='reset')": _stepping(
            lambda: EMA(half_life="100ba").write_back(every="1ba", optimizer_state="reset")
        ),
    }


def measure(
    rows: dict[str, Row],
    params: int,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    clock: Clock = time.perf_counter,
) -> dict[str, float]:
    """The median seconds of each row's call on one model of about ``params`` parameters of ``dtype``."""
    torch.manual_seed(0)
    model = model_of(params, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    calls = {name: row(model) for name, row in rows.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            optimizer.step()  # untimed: Adam's state exists for 'reset' to drop
            start = clock()
            call()
            if round_:  # the first round makes the storages and update plans
                samples[name].append(clock() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def theta0_bytes(params: int, dtype: torch.dtype) -> float:
    """Bytes of BEMA's ``theta_0`` per parameter of a model of ``dtype``."""
    model = model_of(params, dtype)
    bema = BEMA(update_interval="1ba")
    bema.attach(model)
    bema.step()
    correction = bema._rule.correction
    assert correction is not None
    return float(correction.nbytes) / sum(p.numel() for p in model.parameters())


def bench_rules(args: argparse.Namespace) -> Table:
    """The rules and write-backs per update against a plain EMA, on one fp32 model (4M parameters; 64K quick)."""
    params = 2**16 if args.quick else 4_000_000
    times = measure({**rule_rows(), **writeback_rows()}, params, args.repeats, clock=args.clock)
    reference = times[REFERENCE]
    numel = sum(p.numel() for p in model_of(params).parameters())
    title = f"rules and write-back per update, {numel / 1e6:.2f}M fp32 parameters" + (QUICK if args.quick else "")
    table = Table(title, ("rule", "median ms", "x plain EMA"))
    table.rows += [(name, seconds * 1e3, seconds / reference) for name, seconds in times.items()]
    table.notes.append("a copy every N steps adds 1/N of the every='1ba' row's extra; x plain EMA: one process")
    table.notes += [
        f"BEMA theta_0 of a {str(d).removeprefix('torch.')} model: {theta0_bytes(params, d):.3f} bytes per parameter"
        for d in (torch.float32, torch.bfloat16)
    ]
    return table
