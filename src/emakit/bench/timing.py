"""Timing: medians of interleaved, shuffled rounds, so that background load hits every row alike."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["Clock", "Update", "time_interleaved"]

Update = Callable[[], object]
#: Seconds from some start: ``time.perf_counter`` (wall clock) or ``time.thread_time`` (this thread's CPU time).
Clock = Callable[[], float]

#: Repeat fast calls within one sample until it lasts about this long (so a cold first call is amortised).
TARGET_SAMPLE_S = 0.01


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _once(fn: Update, inner: int, finish: Update | None, clock: Clock) -> float:
    _sync()
    start = clock()
    for _ in range(inner):
        fn()
    if finish is not None:
        finish()
    _sync()
    return (clock() - start) / inner


def time_interleaved(
    fns: dict[str, Update],
    repeats: int,
    warmup: int = 1,
    finish: dict[str, Update] | None = None,
    target_s: float = TARGET_SAMPLE_S,
    clock: Clock = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, sampled in rounds of one sample each, in shuffled order.

    ``finish[name]``, if given, runs at the end of each of that function's samples, inside the timing (to
    wait for work the function left running). Fast functions are repeated within a sample to last about
    ``target_s``. ``clock`` is the wall clock by default; ``time.thread_time`` counts only this thread's CPU
    time, which other processes competing for the cores do not inflate (valid with one torch thread).
    """
    finish = finish or {}
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        estimate = min(_once(fn, 1, finish.get(name), clock) for _ in range(3))
        inner[name] = max(1, min(1000, int(target_s / max(estimate, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)  # no row always runs just after the same other row (cache contents, clock ramps)
        for name in order:
            samples[name].append(_once(fns[name], inner[name], finish.get(name), clock))
    return {name: statistics.median(values) for name, values in samples.items()}
