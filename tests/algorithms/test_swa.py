"""SWA in emakit's Trainer: torch's AveragedModel + update_bn on the same run, evaluation and export on the
averaged model, the SWALR schedule, exact resume inside the window, and the refusal to run beside an EMA."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, SWA, export_ema_weights
from emakit.core import Callback, Event
from emakit.trainer import Trainer, evaluate


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def make_loader(shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(48, 4, generator=generator) * 2 + 1
    y = (x[:, 0] > 1).long() + (x[:, 1] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(4))


class Torch(Callback):
    """torch's own SWA on the Trainer's run: AveragedModel.update_parameters at each epoch end of the window."""

    def __init__(self, model: nn.Module, first_epoch: int) -> None:
        self.averaged = AveragedModel(model)
        self.first_epoch = first_epoch
        self.lrs: list[float] = []

    def run_event(self, event: Event, state: Any, logger: Any) -> None:
        if event == Event.EPOCH_END and state.timestamp.epoch >= self.first_epoch:
            self.averaged.update_parameters(state.model)
        if event == Event.BATCH_END:
            self.lrs.append(state.optimizers[0].param_groups[0]["lr"])


def test_swa_in_the_trainer_is_averaged_model_and_update_bn(tmp_path: Path) -> None:
    model = make_model()
    theirs = Torch(model, first_epoch=3)
    swa = SWA(swa_start="3ep")
    trainer = Trainer(model, make_loader(), "6ep", algorithms=[swa], callbacks=[theirs], progress_bar=False)
    trainer.fit()
    assert swa.window_closed and swa.bn_updated and swa.n_averaged == int(theirs.averaged.n_averaged) == 4
    update_bn(make_loader(), theirs.averaged)
    ours = swa.ema_model.state_dict()
    for name, t in theirs.averaged.module.state_dict().items():
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-7, msg=name)
    # evaluation runs the averaged, BN-recomputed model; the export writes it
    expected = evaluate(theirs.averaged.module, make_loader())
    assert trainer.eval(make_loader()) == pytest.approx(expected, rel=1e-5)
    export_ema_weights(swa, tmp_path / "swa.pt")
    exported = torch.load(tmp_path / "swa.pt")
    for name, t in theirs.averaged.module.state_dict().items():
        torch.testing.assert_close(exported[name], t, rtol=1e-6, atol=1e-7, msg=name)


def test_swa_window_end_recomputes_batch_norm_then_stops() -> None:
    model = make_model()
    theirs = Torch(model, first_epoch=2)
    swa = SWA(swa_start="2ep", swa_end="4ep")
    Trainer(model, make_loader(shuffle=True), "7ep", algorithms=[swa], callbacks=[theirs], progress_bar=False).fit()
    assert swa.n_averaged == 3 and int(theirs.averaged.n_averaged) == 6
    assert swa.bn_updated
    # the training run is the same with and without the BN pass (its shuffling draws no training RNG)
    plain = make_model()
    Trainer(plain, make_loader(shuffle=True), "7ep", progress_bar=False).fit()
    for name, t in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_swa_lr_is_torchs_swalr(strategy: str) -> None:
    """Per batch, the rate anneals from the optimizer's to swa_lr over anneal_time, then stays (SWALR's rule,
    stepped per batch here: anneal_epochs counted in batches)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    log = Torch(model, first_epoch=99)
    swa = SWA(swa_start="2ep", swa_lr=0.05, anneal_time="4ba", anneal_strategy=strategy)
    Trainer(model, make_loader(), "4ep", algorithms=[swa], callbacks=[log], optimizers=optimizer,
            progress_bar=False).fit()  # fmt: skip
    reference = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.5)
    scheduler = SWALR(reference, swa_lr=0.05, anneal_epochs=4, anneal_strategy=strategy)
    expected = [0.5] * 12
    for _ in range(12):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    assert log.lrs == pytest.approx(expected, rel=1e-12)
    assert math.isclose(log.lrs[-1], 0.05)


def test_swa_resumes_bitwise_inside_the_window(tmp_path: Path) -> None:
    def trainer(**kwargs: Any) -> tuple[Trainer, SWA]:
        swa = SWA(swa_start="2ep", swa_end="5ep", swa_lr=0.02, anneal_time="3ba")
        return Trainer(make_model(), make_loader(shuffle=True), "6ep", algorithms=[swa], progress_bar=False,
                       seed=1, **kwargs), swa  # fmt: skip

    whole, whole_swa = trainer()
    whole.fit()
    cut, _ = trainer(save_folder=tmp_path, save_interval="1ep")
    cut.fit()
    resumed, resumed_swa = trainer(load_path=tmp_path / "ep3-ba18.pt")
    resumed.fit()
    assert resumed_swa.window_closed and resumed_swa.bn_updated
    for name, t in whole_swa.ema_tensors.items():
        assert torch.equal(resumed_swa.ema_tensors[name], t), name
    for name, t in whole.state.model.state_dict().items():
        assert torch.equal(resumed.state.model.state_dict()[name], t), name


def test_ema_and_swa_are_refused_together() -> None:
    with pytest.raises(ValueError, match=r"EMA and SWA do not compose.*got algorithms EMA and SWA"):
        Trainer(make_model(), make_loader(), "1ep", algorithms=[EMA(half_life="5ba"), SWA()], progress_bar=False)


def test_anneal_time_zero_is_a_constant_swa_lr() -> None:
    model = make_model()
    log = Torch(model, first_epoch=99)
    swa = SWA(swa_start="1ep", swa_lr=0.03, anneal_time="0ba")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    Trainer(model, make_loader(), "2ep", algorithms=[swa], callbacks=[log], optimizers=optimizer,
            progress_bar=False).fit()  # fmt: skip
    assert log.lrs == [0.5] * 6 + [0.03] * 6
