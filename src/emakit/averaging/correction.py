"""BEMA's bias correction: the weights at the start (``theta_0``) and the corrected average evaluated from them.

A :class:`~emakit.averaging.schedules.BiasCorrected` average is an EMA like any other (the averager blends it
with the schedule's weights); what is evaluated, swapped in, published, exported and given as ``ema_model`` is

    evaluated = average + alpha_n * (theta - theta_0)

with ``theta`` the training weights when the evaluated weights are asked for, ``alpha_n`` the schedule's
:meth:`~emakit.averaging.schedules.BiasCorrected.correction` after the last update, and ``theta_0`` the training
weights at the start. :class:`Correction` keeps ``theta_0`` and one buffer laid out like the average, rewritten
in place each time the evaluated weights are asked for (so an ``ema_model`` built over it follows). Only the
averaged (floating) tensors are corrected; copied buffers are the average's.

``theta_0`` is an exact copy of the weights, so it is kept in the model's dtype: 2 bytes per parameter for a
bf16/fp16 model, 4 for fp32, shard-local under FSDP2 (each rank keeps its shards). The evaluated buffer has the
average's dtype (fp32 with ``fp32_ema``) and exists once the evaluated weights were first asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from emakit.averaging.schedules import BiasCorrected, Schedule
from emakit.averaging.tracked import TrackedModel
from emakit.engine.storage import FlatStorage, check_state_matches
from emakit.parallel.sharding import local_tensor

__all__ = ["Correction"]


class Correction:
    """``theta_0`` of a bias-corrected average and the buffer its evaluated weights are written to."""

    def __init__(self, schedule: BiasCorrected) -> None:
        self.schedule = schedule
        #: The tracked training tensors at the start, in their own dtypes (None before the start).
        self.theta_0: FlatStorage | None = None
        self._evaluated: FlatStorage | None = None
        #: How many times the evaluated weights were rewritten (so that cast copies of them know to follow).
        self.refreshes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by ``theta_0`` (the evaluated buffer aside)."""
        return 0 if self.theta_0 is None else self.theta_0.nbytes

    def start(self, sources: Mapping[str, torch.Tensor]) -> None:
        """Keep a copy of ``sources`` (the training weights at the start) as ``theta_0``."""
        if self.theta_0 is not None and self.theta_0.names == list(sources):
            self.theta_0.copy_from(list(sources.values()))
        else:
            self.theta_0 = FlatStorage(dict(sources), fp32_ema=False)
            self._evaluated = None

    def drop(self) -> None:
        """Forget ``theta_0`` and the evaluated buffer (the tracked set changed, or a state from before the start)."""
        self.theta_0 = self._evaluated = None

    @torch.no_grad()
    def evaluated(self, average: FlatStorage, live: Sequence[torch.Tensor], n: int) -> FlatStorage:
        """``average + alpha_n * (live - theta_0)`` for the averaged tensors, written into the evaluated buffer."""
        assert self.theta_0 is not None
        if self._evaluated is None or self._evaluated.names != average.names:
            self._evaluated = FlatStorage(average.state_dict(), fp32_ema=False)  # the average's dtypes and layout
        alpha = self.schedule.correction(n)
        self.refreshes += 1
        targets = self._evaluated.views()
        averaged = set(average.averaged)
        pairs = [
            (target, now, start, mean)
            for target, now, start, mean, name in zip(
                targets, live, self.theta_0.views(), average.views(), average.names, strict=True
            )
            if name in averaged
        ]
        if pairs:
            outs, nows, starts, means = (list(column) for column in zip(*pairs, strict=True))
            torch._foreach_copy_(outs, nows)
            torch._foreach_sub_(outs, starts)
            torch._foreach_mul_(outs, alpha)
            torch._foreach_add_(outs, means)
        copied = [name for name in average.names if name not in averaged]
        for name in copied:
            self._evaluated.tensors[name].copy_(average.tensors[name])
        return self._evaluated

    def state(self, tracked: TrackedModel) -> dict[str, torch.Tensor] | None:
        """``theta_0`` by name as the model's tensors (DTensors for a sharded model), for the averager's state."""
        return None if self.theta_0 is None else tracked.as_model_tensors(self.theta_0.state_dict())

    @staticmethod
    def read(saved: Any, tracked: TrackedModel, started: bool) -> dict[str, torch.Tensor] | None:
        """A saved ``theta_0``, checked against the tracked tensors (this rank's shards); None before the start."""
        if not started:
            return None
        if not isinstance(saved, Mapping):
            raise ValueError(
                "BEMA state is marked started but holds no 'theta_0' (the weights at the start): it was not saved by a "
                "BEMA, or was saved before theta_0 was kept"
            )
        live = dict(zip(tracked.names, tracked.model_tensors() if tracked.sharded else tracked.live(), strict=True))
        check_state_matches(saved, live, "BEMA theta_0")
        return {name: local_tensor(t) for name, t in saved.items()} if tracked.sharded else dict(saved)

    def restore(self, theta_0: Mapping[str, torch.Tensor] | None, tracked: TrackedModel) -> None:
        """Set ``theta_0`` to a value from :meth:`read` (None: forget it)."""
        if theta_0 is None:
            self.drop()
            return
        live = dict(zip(tracked.names, tracked.live(), strict=True))
        self.start(live)
        assert self.theta_0 is not None
        self.theta_0.load_state_dict(theta_0, "BEMA theta_0")


def correction_for(schedule: Schedule) -> Correction | None:
    """The correction a schedule's evaluated weights need (BEMA's), or None."""
    return Correction(schedule) if isinstance(schedule, BiasCorrected) else None
