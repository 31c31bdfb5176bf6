"""A Lightning callback that drives :class:`emakit.averaging.SWA`: ``Trainer(callbacks=[SWACallback("3ep")])``.

It is :class:`~emakit.integrations.lightning.EMACallback` (same events, swaps, checkpoints and strategies)
driving an SWA instead of an EMA, plus the window's end: when the window closes (at ``swa_end``, or at the
end of ``fit`` without one) the average's BatchNorm statistics are recomputed over the training data, so
validation, test, predict, checkpoints and exports after it use the averaged model as it should run.
Importing this module imports Lightning; ``import emakit`` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from emakit.averaging.swa import SWA
from emakit.integrations.lightning import EMACallback, pl
from emakit.rng import capture_rng, loader_generators, restore_rng
from emakit.time import Time

try:
    from lightning.pytorch.utilities import move_data_to_device
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning.utilities import move_data_to_device

__all__ = ["SWACallback"]

_AVERAGING_CALLBACKS = ("EMACallback", "WeightAveraging", "EMAWeightAveraging", "StochasticWeightAveraging")


class SWACallback(EMACallback):
    """Keep the equal-weight average (SWA) of a LightningModule's weights over a window; evaluate and checkpoint
    with it once the window has opened.

    Args:
        swa_start: when the window opens (see :class:`emakit.averaging.SWA`; ``'ba'`` counts optimizer
            steps, ``'dur'`` a fraction of ``max_steps`` if set, else of ``max_epochs``).
        swa_end: when it closes (default: the end of training).
        update_interval: time between updates (default ``'1ep'``).
        update_bn: recompute BatchNorm statistics when the window closes (default True).
        fp32_ema: fp32 average for fp16/bf16 tensors (default True).
        skip_nonfinite: skip updates while the weights hold NaN/Inf.
        flatten_model: one buffer per (device, dtype) for the model.
        bn_forward: ``bn_forward(module, batch)`` runs one training batch for the BatchNorm pass (default: the
            module on the batch's first element when it is a list or tuple, else on the batch, as torch's
            ``update_bn``). The batch is already on the module's device.
        weights_after_fit: as :class:`~emakit.integrations.lightning.EMACallback`'s.

    Lightning's own learning-rate schedulers stay in charge of the rate: for torch's ``SWALR``, return it from
    ``configure_optimizers``. An EMACallback (or Lightning's weight averaging) in the same Trainer is refused.
    """

    def __init__(
        self,
        swa_start: str | Time = "0.75dur",
        swa_end: str | Time | None = None,
        update_interval: str | Time = "1ep",
        update_bn: bool = True,
        fp32_ema: bool = True,
        skip_nonfinite: bool = False,
        flatten_model: bool = False,
        *,
        bn_forward: Callable[[Any, Any], Any] | None = None,
        weights_after_fit: Literal["training", "ema"] = "training",
    ) -> None:
        super().__init__(weights_after_fit=weights_after_fit)
        #: The SWA this callback drives (under the name the EMACallback's events use).
        self.ema: SWA = SWA(  # type: ignore[assignment]  # drives the same verbs
            swa_start=swa_start,
            swa_end=swa_end,
            update_interval=update_interval,
            update_bn=update_bn,
            fp32_ema=fp32_ema,
            skip_nonfinite=skip_nonfinite,
            flatten_model=flatten_model,
        )
        self.bn_forward = bn_forward

    @property
    def swa(self) -> SWA:
        """The SWA this callback drives."""
        return self.ema

    def __repr__(self) -> str:
        return f"SWACallback({self.ema!r}, weights_after_fit={self.weights_after_fit!r})"

    @property
    def state_key(self) -> str:
        """``"SWACallback"``."""
        return "SWACallback"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            name = type(callback).__name__
            if callback is not self and name in _AVERAGING_CALLBACKS:
                raise ValueError(
                    f"EMA and SWA do not compose: SWACallback and {name} would each put their own average into the "
                    "module for validation and checkpoints (model-averaging methods do not compose well); use one"
                )
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        closed = self.ema.window_closed
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.ema.window_closed and not closed:
            self._recompute_batch_norm(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        closed = self.ema.window_closed
        super().on_train_epoch_end(trainer, pl_module)
        if self.ema.window_closed and not closed:
            self._recompute_batch_norm(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema.started and not self.ema.window_closed and self._follows(pl_module):
            self.ema.close_window()
            self._recompute_batch_norm(trainer, pl_module)
        super().on_fit_end(trainer, pl_module)

    def _recompute_batch_norm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One pass of the average over the training data, the training run's random state left as it was."""
        loader = trainer.train_dataloader
        if not self.ema.bn_update or self.ema.bn_updated or loader is None or not self.ema.started:
            return
        run = self.bn_forward

        def forward(module: Any, batch: Any) -> None:
            batch = move_data_to_device(batch, pl_module.device)
            if run is not None:
                run(module, batch)
            else:
                module(batch[0] if isinstance(batch, (list, tuple)) else batch)

        generators = loader_generators(loader)
        drawn = capture_rng(generators)
        try:
            self.ema.update_bn(loader, pl_module, forward)
        finally:
            restore_rng(drawn, generators)
