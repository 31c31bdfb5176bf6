"""Overlapping an EMA update with the next training step.

An update reads the weights and reads and writes the average. Nothing in the next step's forward and
backward writes the parameters, so the parameters' part of the update can run while that forward and
backward run, and only the next optimizer step (which writes the parameters) has to wait for it. Buffers
are different: BatchNorm's forward and DDP's buffer broadcast write them, so the EMA blends buffers before
it hands the parameters' part over.

Two ways to run the parameters' part alongside the step:

- :class:`StreamOverlap`, for CUDA tensors: the kernels go to a side stream that first waits for
  everything already queued on the current stream (the optimizer step that produced the weights). Waiting
  is a GPU-side ``wait_event`` on the waiting stream: the host never blocks.
- :class:`ThreadOverlap`, for CPU tensors: one worker thread runs the kernels (torch releases the GIL
  inside them) while the main thread goes on; waiting joins it and re-raises its error, if any.

Every overlap installs a global optimizer step pre-hook, so any ``torch.optim.Optimizer`` step (the
Trainer's, or one in a hand-written loop) waits for the pending update before it writes the weights.
Everything else that reads the average or writes the weights (evaluation swaps, checkpoints,
``ema_model``, ``state_dict``) waits through the EMA's own methods.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["Overlap", "StreamOverlap", "ThreadOverlap", "make_overlap"]


class Overlap:
    """Runs one piece of work at a time alongside the caller; :meth:`wait` makes its results visible.

    Subclasses implement :meth:`_start` and :meth:`_finish`; the base class keeps track of the pending work
    and makes every optimizer step wait for it.
    """

    def __init__(self) -> None:
        self._pending = False
        ref = weakref.ref(self)

        def wait_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me.wait()

        # Kept while this object lives: removing a hook from inside a hook call would break torch's loop.
        handle = register_optimizer_step_pre_hook(wait_before_step)
        weakref.finalize(self, handle.remove)

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

    def _finish(self) -> None:
        if self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._done = None


class ThreadOverlap(Overlap):
    """Runs the work on one worker thread (for CPU tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emakit-ema")
        self._future: Future[None] | None = None
        weakref.finalize(self, self._executor.shutdown, wait=True)

    def _start(self, work: Callable[[], None]) -> None:
        self._future = self._executor.submit(work)

    def _finish(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()


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
