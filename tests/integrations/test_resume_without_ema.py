"""Resuming a Lightning EMA checkpoint without the EMACallback: the trap, and the hook that avoids it.

docs/integrations.md ("Resuming without the EMA") says what Lightning does and what to write instead; this
checks both claims against real fits. Expectation: the EMA does not change training, so a resumed run that
starts from the training weights ends where the uninterrupted EMA run's training weights are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_worker import LIGHTNING_NOTICES, Net, make_loader, make_net, make_trainer, weights

from emakit.integrations.lightning import TRAINING_STATE_KEY, EMACallback

pytestmark = pytest.mark.filterwarnings(*LIGHTNING_NOTICES)


class TrainsOnFromTrainingWeights(Net):
    """The recipe of the docs: put the training weights where Lightning loads the model from."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TRAINING_STATE_KEY in checkpoint:
            checkpoint["state_dict"] = checkpoint[TRAINING_STATE_KEY]


class WeightsAtStart(Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = weights(pl_module)


@pytest.fixture
def ema_run(tmp_path: Path) -> tuple[Net, Path]:
    model = make_net()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    make_trainer([EMACallback(half_life="3ba"), checkpoints], max_epochs=2, enable_checkpointing=True).fit(
        model, make_loader()
    )
    return model, tmp_path / "epoch=0.ckpt"


def test_without_the_callback_lightning_trains_on_from_the_ema_weights(ema_run: tuple[Net, Path]) -> None:
    _, path = ema_run
    saved = torch.load(path, weights_only=True)
    assert not torch.equal(saved["state_dict"]["fc1.weight"], saved[TRAINING_STATE_KEY]["fc1.weight"])
    start = WeightsAtStart()
    with pytest.warns(UserWarning, match=r"Please add the following callbacks: \[.*'EMACallback'"):  # a set: any order
        make_trainer([start], max_epochs=2).fit(make_net(seed=9), make_loader(), ckpt_path=path)
    assert torch.equal(start.weights["fc1.weight"], saved["state_dict"]["fc1.weight"])  # the EMA weights


def test_on_load_checkpoint_hook_resumes_from_the_training_weights(ema_run: tuple[Net, Path]) -> None:
    whole, path = ema_run
    torch.manual_seed(9)
    resumed = TrainsOnFromTrainingWeights()
    start = WeightsAtStart()
    with pytest.warns(UserWarning, match=r"Please add the following callbacks"):
        make_trainer([start], max_epochs=2).fit(resumed, make_loader(), ckpt_path=path)
    saved = torch.load(path, weights_only=True)
    assert torch.equal(start.weights["fc1.weight"], saved[TRAINING_STATE_KEY]["fc1.weight"])
    expected = weights(whole)
    for name, value in weights(resumed).items():
        assert torch.equal(value, expected[name]), name
