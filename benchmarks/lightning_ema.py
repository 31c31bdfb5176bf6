"""The EMA's cost per optimizer step inside a Lightning fit: emakit's ``EMACallback`` vs Lightning's ``EMAWeightAveraging``.

python benchmarks/lightning_ema.py [--quick] [--shapes resnet,many] [--steps N] [--rounds N] [--threads N]

Models from ``emakit.bench.build_model``: the ResNet-50-like conv net (25.6M parameters, 161 parameter tensors
and 159 BatchNorm buffers) and 2,000 ``Linear(15, 16)`` (4,000 small tensors). Each fit trains ``--steps``
optimizer steps (plain SGD, small inputs: the EMA's cost does not depend on the input, only the step's does)
after two warm-up steps, with no EMA, with each callback at the same decay (``smoothing`` = Lightning's
``decay`` = 0.999), and with emakit's ``flatten_model=True``. Rounds run the configurations in shuffled order, each on a fresh copy of the
model, so that background load hits all of them alike.

Two figures per configuration, both medians over all measured steps of all rounds:

- *hook*: the time spent in the callback's ``on_train_batch_end`` (where both callbacks update): the EMA's own
  cost, precise to microseconds;
- *step*: the time from one ``on_train_batch_end`` to the next (forward, backward, optimizer step, hooks);
  *step - none* is the EMA's cost seen on the step, noisier on a shared machine.

Printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit.bench import build_model
from emakit.bench.shapes import ManyLinears
from emakit.integrations.lightning import EMACallback

SMOOTHING = 0.999
WARMUP_STEPS = 2


class Module(pl.LightningModule):
    """A benchmark network under Lightning; the loss is the mean of its output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class StepClock(Callback):
    """Seconds between successive ``on_train_batch_end`` calls, after the warm-up steps."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > WARMUP_STEPS:
            self.steps.append(now - self._last)
        self._last = now


def timed(callback: Callback, into: list[float]) -> Callback:
    """``callback`` with the seconds of each ``on_train_batch_end`` after warm-up appended to ``into``."""
    update = callback.on_train_batch_end

    def on_train_batch_end(trainer: pl.Trainer, *args: Any) -> None:
        start = time.perf_counter()
        update(trainer, *args)
        if trainer.global_step > WARMUP_STEPS:
            into.append(time.perf_counter() - start)

    callback.on_train_batch_end = on_train_batch_end  # type: ignore[method-assign,assignment]
    return callback


CONFIGS: dict[str, Callable[[], Callback | None]] = {
    "no EMA": lambda: None,
    "emakit EMACallback": lambda: EMACallback(smoothing=SMOOTHING),
    "emakit EMACallback, flatten_model=True": lambda: EMACallback(smoothing=SMOOTHING, flatten_model=True),
    "Lightning EMAWeightAveraging": lambda: EMAWeightAveraging(decay=SMOOTHING),
}


def inputs(template: nn.Module, quick: bool, count: int) -> TensorDataset:
    """``count`` inputs that ``template`` (a model from ``build_model``) accepts."""
    if isinstance(template, ManyLinears):  # every layer reads the same input
        features = next(layer for layer in template.modules() if isinstance(layer, nn.Linear)).in_features
        return TensorDataset(torch.randn(count, features))
    size = 32 if quick else 64
    return TensorDataset(torch.randn(count, 3, size, size))


def fit_once(
    template: nn.Module, data: TensorDataset, batch: int, steps: int, make: Callable[[], Callback | None]
) -> tuple[list[float], list[float]]:
    """One fit of ``steps`` measured steps; returns (step seconds, hook seconds)."""
    clock, hooks = StepClock(), list[float]()
    callback = make()
    callbacks: list[Callback] = [clock]
    if callback is not None:
        callbacks.append(timed(callback, hooks))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=WARMUP_STEPS + steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Module(copy.deepcopy(template)), DataLoader(data, batch_size=batch))
    return clock.steps, hooks


def run_shape(shape: str, quick: bool, steps: int, rounds: int, batch: int) -> None:
    template = build_model(shape, quick=quick)
    data = inputs(template, quick, (WARMUP_STEPS + steps) * batch)
    step_times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    hook_times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            got_steps, got_hooks = fit_once(template, data, batch, steps, CONFIGS[name])
            step_times[name] += got_steps
            hook_times[name] += got_hooks

    numel = sum(p.numel() for p in template.parameters())
    tensors = len(list(template.parameters())) + len(list(template.buffers()))
    print(
        f"\n== EMA cost per optimizer step in a Lightning fit, {shape}: {numel / 1e6:.1f}M parameters, {tensors} tensors"
    )
    print(f"{'configuration':<42}{'step ms':>10}{'hook ms':>10}{'step - none ms':>16}{'hook / Lightning':>18}")
    print("-" * 96)
    none = statistics.median(step_times["no EMA"])
    theirs = statistics.median(hook_times["Lightning EMAWeightAveraging"])
    for name in CONFIGS:
        step = statistics.median(step_times[name])
        if name == "no EMA":
            print(f"{name:<42}{step * 1e3:>10.2f}{0.0:>10.3f}{0.0:>16.2f}{0.0:>18.3f}")
            continue
        hook = statistics.median(hook_times[name])
        print(f"{name:<42}{step * 1e3:>10.2f}{hook * 1e3:>10.3f}{(step - none) * 1e3:>16.2f}{hook / theirs:>18.3f}")
    print(f"   note: medians of {rounds} rounds x {steps} steps, batch {batch}, smoothing {SMOOTHING}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default="resnet,many", help="comma-separated: resnet, many")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per fit (default 20, quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small models, a few steps: a smoke run")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    warnings.filterwarnings("ignore")
    for logger_name in ("lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(logger_name).setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, {args.threads} thread(s), python {sys.version.split()[0]}"
    )
    for shape in args.shapes.split(","):
        run_shape(shape.strip(), args.quick, steps, rounds, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
