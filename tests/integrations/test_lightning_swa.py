"""SWACallback under Lightning: after the window, validation runs on the averaged weights with BatchNorm
statistics recomputed (torch's AveragedModel + update_bn on the same run), and EMA + SWA is refused."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset

from emakit.integrations.lightning import EMACallback, SWACallback


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def loader(shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(48, 4, generator=generator) * 2 + 1
    y = (x[:, 0] > 1).long() + (x[:, 1] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle)


class Recorder(Callback):
    """torch's SWA on the same run (AveragedModel at the window's epoch ends) and what validation sees."""

    def __init__(self, module: Module, epochs: tuple[int, ...]) -> None:
        self.averaged = AveragedModel(module.net)
        self.epochs = epochs
        self.validated: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 in self.epochs:
            self.averaged.update_parameters(pl_module.net)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated[trainer.current_epoch + 1] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}


def trainer(callbacks: list[Any], epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def test_validation_after_the_window_runs_on_the_averaged_batch_norm_recomputed_weights() -> None:
    module = Module()
    swa = SWACallback(swa_start="2ep", swa_end="4ep")
    recorder = Recorder(module, epochs=(2, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([swa, recorder], epochs=6).fit(module, loader(), loader())
    assert swa.averager.window_closed and swa.averager.bn_updated and (swa.averager.n_averaged - 1) + 1 == 3
    update_bn(loader(), recorder.averaged)
    theirs = recorder.averaged.module.state_dict()
    for epoch in (5, 6):  # validation after the window
        for name, t in theirs.items():
            torch.testing.assert_close(recorder.validated[epoch][name], t, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(recorder.validated[1]["1.running_mean"], theirs["1.running_mean"])
    # the training weights are back after validation, and trained on
    assert not torch.equal(module.net[0].weight, theirs["0.weight"])


def test_a_window_without_end_closes_with_fit() -> None:
    module = Module()
    swa = SWACallback(swa_start="3ep")
    recorder = Recorder(module, epochs=(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = trainer([swa, recorder], epochs=4)
        fitted.fit(module, loader())
        assert swa.averager.bn_updated
        update_bn(loader(), recorder.averaged)
        fitted.validate(module, loader(), verbose=False)
    (validated,) = recorder.validated.values()  # the one validation, after fit
    for name, t in recorder.averaged.module.state_dict().items():
        torch.testing.assert_close(validated[name], t, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("other", [lambda: EMACallback(half_life="5ba")])
def test_ema_and_swa_callbacks_are_refused_together(other: Any) -> None:
    with pytest.raises(
        ValueError, match=r"EMA and SWA do not compose: (SWACallback and EMACallback|EMACallback and SWACallback)"
    ):
        trainer([other(), SWACallback()], epochs=1).fit(Module(), loader())
