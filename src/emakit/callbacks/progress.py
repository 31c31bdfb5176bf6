"""ProgressBar: a tqdm bar over training batches showing the loss and the latest evaluation metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from emakit.core.callback import Callback
from emakit.time import TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """Show training progress on rank 0: batches done of the total, loss, latest eval accuracy/loss."""

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self.tqdm_kwargs = tqdm_kwargs
        self._bar: Any = None

    def _total(self, state: State) -> int | None:
        unit, value = state.max_duration.unit, int(state.max_duration.value)
        if unit == TimeUnit.BATCH:
            return value
        if unit == TimeUnit.EPOCH and state.batches_per_epoch:
            return value * state.batches_per_epoch
        return None

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.rank != 0:
            return
        self._bar = tqdm(
            total=self._total(state),
            initial=state.timestamp.batch,
            unit="ba",
            dynamic_ncols=True,
            **self.tqdm_kwargs,
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._bar is None:
            return
        postfix: dict[str, str] = {"ep": str(state.timestamp.epoch)}
        if state.loss is not None:
            postfix["loss"] = f"{state.loss.item():.4f}"
        for key in ("eval/accuracy", "eval/loss"):
            if key in state.eval_metrics:
                postfix[key.split("/")[1]] = f"{state.eval_metrics[key]:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
