"""What a schedule needs kept between updates beyond the count ``n``, in one place the averager talks to.

- A half-life in samples or tokens (:class:`~emakit.averaging.schedules.PerAmount`) weighs each update by the
  amount seen since the previous one: :class:`RuleState` keeps the clock's count at the last start or update.
- BEMA (:class:`~emakit.averaging.schedules.BiasCorrected`) evaluates corrected weights from ``theta_0``:
  :class:`RuleState` holds its :class:`~emakit.averaging.correction.Correction`.

For every other schedule it is a pass-through: the weights are ``schedule.weights(n)`` and the evaluated
weights the average itself. Both facts are saved in the averager's state (``amount_at_update``, ``theta_0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from emakit.averaging.correction import correction_for
from emakit.averaging.schedules import PerAmount, Schedule
from emakit.averaging.tracked import TrackedModel
from emakit.engine.storage import FlatStorage
from emakit.time import Timestamp, TimeUnit

__all__ = ["RuleState", "check_amounts"]


class RuleState:
    """The schedule's kept facts: the amount counted at the last update, BEMA's ``theta_0``."""

    def __init__(self, schedule: Schedule) -> None:
        # the schedule itself stays the averager's (it may learn the training length later): each call is given it
        self.correction = correction_for(schedule)
        #: The clock's samples or tokens at the last start or update (a :class:`PerAmount` schedule's reference).
        self.amount_at_update = 0

    def start(self, schedule: Schedule, sources: Mapping[str, torch.Tensor], timestamp: Timestamp) -> None:
        """The average starts now, as a copy of ``sources``."""
        if isinstance(schedule, PerAmount):
            self.amount_at_update = timestamp.get(schedule.unit)
        if self.correction is not None:
            self.correction.start(sources)

    def weights(self, schedule: Schedule, n: int, timestamp: Timestamp) -> list[float]:
        """Each average's weight ``1 - beta`` at the update that brings it to ``n`` models, happening now."""
        if not isinstance(schedule, PerAmount):
            return schedule.weights(n)
        now = timestamp.get(schedule.unit)
        seen, self.amount_at_update = now - self.amount_at_update, now
        return schedule.weights_after(seen)

    @property
    def refreshes(self) -> int:
        """How many times BEMA's evaluated weights were rewritten (0 otherwise): ``ema_model``'s casts follow it."""
        return 0 if self.correction is None else self.correction.refreshes

    def evaluated(self, average: FlatStorage, training: Callable[[], list[torch.Tensor]], n: int) -> FlatStorage:
        """What is evaluated, swapped in and published: the average, or BEMA's corrected weights."""
        if self.correction is None:
            return average
        return self.correction.evaluated(average, training(), n)

    def refuse_update_bn(self, averager: str) -> None:
        """ValueError for BEMA: its evaluated weights are rebuilt from the average and the training weights at every
        read, so BatchNorm statistics recomputed into them would be lost at the next read."""
        if self.correction is not None:
            raise ValueError(
                f"{averager}: update_bn cannot keep BatchNorm statistics for BEMA: its evaluated weights, "
                "EMA + alpha * (theta_t - theta_0), are rebuilt from the average and the training weights at every "
                "read (the running statistics too, corrected like the weights with buffers='average'). To measure "
                f"statistics on the evaluated weights, run them on a copy: model = copy.deepcopy({averager.lower()}"
                ".ema_model); torch.optim.swa_utils.update_bn(loader, model)"
            )

    def drop(self) -> None:
        """The averages were dropped: so is what was kept for them."""
        if self.correction is not None:
            self.correction.drop()

    def save(self, schedule: Schedule, state: dict[str, Any], tracked: TrackedModel) -> dict[str, Any]:
        """``state`` (the averager's) with these facts added."""
        if isinstance(schedule, PerAmount):
            state["amount_at_update"] = self.amount_at_update
        if self.correction is not None:
            state["theta_0"] = self.correction.state(tracked)
        return state

    def read(
        self, schedule: Schedule, state: Mapping[str, Any], tracked: TrackedModel
    ) -> tuple[int, dict[str, torch.Tensor] | None]:
        """The facts of a saved ``state``, checked (nothing changes yet): for :meth:`restore`."""
        amount = state.get("amount_at_update", 0)
        if isinstance(schedule, PerAmount) and (isinstance(amount, bool) or not isinstance(amount, int)):
            raise ValueError(f"EMA state: amount_at_update must be an int, got {amount!r}")
        theta_0 = None
        if self.correction is not None:
            theta_0 = self.correction.read(state.get("theta_0"), tracked, bool(state.get("started")))
        return int(amount), theta_0

    def restore(self, read: tuple[int, dict[str, torch.Tensor] | None], tracked: TrackedModel) -> None:
        """Apply what :meth:`read` returned."""
        self.amount_at_update = read[0]
        if self.correction is not None:
            self.correction.restore(read[1], tracked)


def check_amounts(schedule: Schedule, averager: str, *, num_samples: int, num_tokens: int) -> None:
    """ValueError naming the argument when a schedule in samples or tokens is not told them at a step."""
    for unit, name, amount in (
        (TimeUnit.SAMPLE, "num_samples", num_samples),
        (TimeUnit.TOKEN, "num_tokens", num_tokens),
    ):
        if schedule.counts(unit) and not amount:
            what = "samples" if unit == TimeUnit.SAMPLE else "tokens"
            raise ValueError(
                f"{averager}: a start, end or half-life in {what} ({schedule.describe()}) needs the {what} of each "
                f"step: call step({name}=...) (got {name}={amount!r}), or give it in 'ba' or 'dur'"
            )
