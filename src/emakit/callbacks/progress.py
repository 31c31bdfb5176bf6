"""ProgressBar: a tqdm bar over training batches showing the loss and the latest evaluation metrics.

:func:`show_progress_bar` is the one rule for every bar emakit draws (this callback's and the demo's):
draw it only when its stream is a terminal. Redirected to a file, a CI log or a pipe, a bar is a
stream of carriage returns that buries the real output, so it is left out there.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from emakit.core.callback import Callback
from emakit.time import TimeUnit

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = ["ProgressBar", "show_progress_bar"]


def show_progress_bar(stream: Any = None) -> bool:
    """Whether to draw a progress bar on ``stream`` (default: ``sys.stderr``, where tqdm writes).

    True only when the stream is a terminal (``isatty()``); False for files, pipes, captured output,
    ``None`` (no stderr, e.g. ``pythonw``) and streams that are closed or have no ``isatty``.
    """
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class ProgressBar(Callback):
    """Show training progress on rank 0: batches done of the total, loss, latest eval accuracy/loss.

    The bar is drawn when :func:`show_progress_bar` says so for its stream (``tqdm_kwargs['file']``,
    else stderr); ``disable=True`` or ``disable=False`` in ``tqdm_kwargs`` overrides that rule.
    """

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
        kwargs = dict(self.tqdm_kwargs)
        disable = kwargs.pop("disable", None)  # None is tqdm's own "decide from the stream"
        if disable is None:
            disable = not show_progress_bar(kwargs.get("file"))
        if disable:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self._total(state), initial=state.timestamp.batch, unit="ba", dynamic_ncols=True, **kwargs
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
