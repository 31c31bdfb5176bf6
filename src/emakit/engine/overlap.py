"""Overlapping an EMA update with the next training step.

An update reads the weights and reads and writes the average. In ordinary training the next step's
forward and backward only read the parameters, so the parameters' part of the update can run while they
run, and only the next optimizer step (which writes the parameters) has to wait for it. Buffers are
different: BatchNorm's forward and DDP's buffer broadcast write them, so the EMA blends buffers (and the
few parameters a forward writes) before it hands the parameters' part over.

Two ways to run the parameters' part alongside the step:

- :class:`StreamOverlap`, for CUDA tensors: the kernels go to a side stream that first waits for
  everything already queued on the current stream (the optimizer step that produced the weights). Waiting
  is a GPU-side ``wait_event`` on the waiting stream: the host never blocks.
- :class:`ThreadOverlap`, for CPU tensors: one worker thread runs the kernels (torch releases the GIL
  inside them) while the main thread goes on; waiting joins it and re-raises its error, if any.

A global optimizer step pre-hook makes every ``torch.optim.Optimizer`` step (the Trainer's, or one in a
hand-written loop) wait for the pending update before it writes the weights. Everything else that reads
the average or writes the weights (evaluation swaps, checkpoints, ``ema_model``, ``state_dict``) waits
through the EMA's own methods. Code that writes the parameters in other ways while an update is pending
must call the EMA's ``wait()`` first: two-step optimizers such as SAM change the weights in a method other
than ``step()``, and ``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` steps inside backward hooks.
(``nn.Embedding(max_norm=...)`` renormalises its weight in the forward; the EMA blends such weights at
once instead.)

A process that forks (``DataLoader(num_workers>0)`` with the default start method on Linux) while the worker
thread is inside a kernel hands the child a copy of torch's thread pools and locks taken mid-kernel, where it
can hang. So before every ``os.fork`` the pending CPU work is waited for (finished, its error, if any, kept
for the EMA's next wait).
"""

from __future__ import annotations

import concurrent.futures
import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["Overlap", "StreamOverlap", "ThreadOverlap", "make_overlap"]


_live: weakref.WeakSet[Overlap] = weakref.WeakSet()
_hooked = False


def _wait_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for overlap in list(_live):
        overlap.wait()


class Overlap:
    """Runs one piece of work at a time alongside the caller; :meth:`wait` makes its results visible.

    Subclasses implement :meth:`_start` and :meth:`_finish`. The base class keeps track of the pending work,
    and one global optimizer step pre-hook (installed once, never removed: removing a hook while torch loops
    over the hooks would break the loop) makes every optimizer step wait for every live overlap.
    """

    def __init__(self) -> None:
        global _hooked
        self._pending = False
        if not _hooked:
            register_optimizer_step_pre_hook(_wait_before_step)
            _hooked = True
        _live.add(self)

    @property
    def pending(self) -> bool:
        """Whether work was launched and not yet waited for."""
        return self._pending

    def launch(self, work: Callable[[], None]) -> None:
        """Start ``work`` alongside the caller, after waiting for the previous work."""
        self.wait()
        self._start(work)
        self._pending = True

    def wait(self) -> None:
        """Make the pending work's results visible to the caller (a no-op when nothing is pending)."""
        if self._pending:
            self._pending = False
            self._finish()

    def _start(self, work: Callable[[], None]) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class StreamOverlap(Overlap):
    """Runs the work's kernels on a CUDA side stream of ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._done: torch.cuda.Event | None = None

    def _start(self, work: Callable[[], None]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            work()
            self._done = self.stream.record_event()

    def wait(self) -> None:
        """Make the current stream wait for the last work. Done on every call, not only the first after a
        launch, so that a reader on another stream is ordered too (a no-op on the GPU once the work is done)."""
        self._pending = False
        if self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)

    def _finish(self) -> None:
        pass


class ThreadOverlap(Overlap):
    """Runs the work on one worker thread (for CPU tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emakit-ema")
        self._future: Future[None] | None = None
        weakref.finalize(self, self._executor.shutdown, wait=True)

    def _start(self, work: Callable[[], None]) -> None:
        try:
            self._future = self._executor.submit(work)
        except RuntimeError:  # the interpreter is shutting down and takes no new work: run it here
            self._future = None
            work()

    def _finish(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def settle(self) -> None:
        """Block until the pending work has run, without taking its result (that stays for :meth:`wait`)."""
        future = self._future
        if future is not None:
            concurrent.futures.wait([future])


def _settle_before_fork() -> None:
    for overlap in list(_live):
        if isinstance(overlap, ThreadOverlap):
            overlap.settle()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_settle_before_fork)


def make_overlap(device: torch.device) -> Overlap:
    """The overlap for tensors on ``device``: a CUDA side stream, or a worker thread for CPU tensors.

    Raises:
        ValueError: ``device`` is neither CUDA nor CPU.
    """
    if device.type == "cuda":
        return StreamOverlap(device)
    if device.type == "cpu":
        return ThreadOverlap()
    raise ValueError(f"overlap=True supports CUDA and CPU tensors, got tensors on {device}")
