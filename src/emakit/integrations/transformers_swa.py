"""A ``transformers.Trainer`` callback that drives :class:`emakit.averaging.SWA`: ``callbacks=[SWACallback("2ep")]``.

It is :class:`~emakit.integrations.transformers.EMACallback` (same events, checkpoint files, resume, and
:class:`~emakit.integrations.transformers.EMATrainerMixin` evaluating and saving the average) driving an SWA,
plus the window's end: when the window closes (at ``swa_end``, or when training ends without one) the
average's BatchNorm statistics are recomputed over the training data. Importing this module imports
transformers; ``import emakit`` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from emakit.averaging.swa import SWA
from emakit.integrations.transformers import EMACallback
from emakit.rng import capture_rng, loader_generators, restore_rng
from emakit.time import Time

__all__ = ["SWACallback"]


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class SWACallback(EMACallback):
    """Keep the equal-weight average (SWA) of the model a ``transformers.Trainer`` trains, over a window.

    Args:
        swa_start: when the window opens (see :class:`emakit.averaging.SWA`; ``'ba'`` counts optimizer
            steps, ``'dur'`` a fraction of ``max_steps``).
        swa_end: when it closes (default: the end of training).
        update_interval: time between updates (default ``'1ep'``).
        update_bn: recompute BatchNorm statistics when the window closes (default True).
        fp32_ema: fp32 average for fp16/bf16 tensors (default True).
        skip_nonfinite: skip updates while the weights hold NaN/Inf.
        flatten_model: one buffer per (device, dtype) for the model.
        bn_forward: ``bn_forward(model, batch)`` for the BatchNorm pass (default: ``model(**batch)`` for the
            Trainer's dict batches, else torch's ``update_bn`` rule). The batch is on the model's device.
        save_ema_as_model: as :class:`~emakit.integrations.transformers.EMACallback`'s.
        eval_with_ema: as :class:`~emakit.integrations.transformers.EMACallback`'s.

    With :class:`~emakit.integrations.transformers.EMATrainerMixin`, an EMACallback beside it is refused.
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
        bn_forward: Callable[[nn.Module, Any], Any] | None = None,
        save_ema_as_model: bool = False,
        eval_with_ema: bool = True,
    ) -> None:
        super().__init__(save_ema_as_model=save_ema_as_model, eval_with_ema=eval_with_ema)
        self._swa_arguments: dict[str, Any] = {
            "swa_start": swa_start,
            "swa_end": swa_end,
            "update_interval": update_interval,
            "update_bn": update_bn,
            "fp32_ema": fp32_ema,
            "skip_nonfinite": skip_nonfinite,
            "flatten_model": flatten_model,
        }
        #: The SWA this callback drives (under the name the EMACallback's events use).
        self.ema: SWA = SWA(**self._swa_arguments)  # type: ignore[assignment]  # drives the same verbs
        self.bn_forward = bn_forward

    def __repr__(self) -> str:
        return f"SWACallback({self.ema!r}, save_ema_as_model={self.save_ema_as_model})"

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._attached:  # a new train() call: a new average
            self.ema = SWA(**self._swa_arguments)
            self._attached = False
        super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        closed = self.ema.window_closed
        super().on_step_end(args, state, control, **kwargs)
        if self.ema.window_closed and not closed:
            self._recompute_batch_norm(kwargs)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        closed = self.ema.window_closed
        super().on_epoch_end(args, state, control, **kwargs)
        if self.ema.window_closed and not closed:
            self._recompute_batch_norm(kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        super().on_train_end(args, state, control, **kwargs)
        if self._attached and self.ema.started and not self.ema.window_closed:
            self.ema.close_window()
            self._recompute_batch_norm(kwargs)

    def _recompute_batch_norm(self, kwargs: dict[str, Any]) -> None:
        """One pass of the average over the Trainer's training data, its random state left as it was."""
        loader = kwargs.get("train_dataloader")
        model = kwargs.get("model")
        if not self.ema.bn_update or self.ema.bn_updated or loader is None or not isinstance(model, nn.Module):
            return
        run = self.bn_forward
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def forward(module: nn.Module, batch: Any) -> None:
            batch = _to(batch, device)
            if run is not None:
                run(module, batch)
            elif isinstance(batch, dict):
                module(**batch)
            else:
                module(batch[0] if isinstance(batch, (list, tuple)) else batch)

        generators = loader_generators(loader)
        drawn = capture_rng(generators)
        try:
            self.ema.update_bn(loader, model, forward)
        finally:
            restore_rng(drawn, generators)
