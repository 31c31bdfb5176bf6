"""SWACallback under transformers.Trainer: the mean of the weights at the window's steps, BatchNorm recomputed
over the training data when the window closes, evaluation on the average, and EMA + SWA refused."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
import torch.nn.functional as F
from _hf_common import training_args
from torch import nn
from transformers import TrainerCallback

from emakit.integrations.transformers import EMACallback, EMATrainer, SWACallback


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 16)
        self.norm = nn.BatchNorm1d(16)
        self.last = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.last(F.relu(self.norm(self.first(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(32, 4, generator=g) * 2 + 1
        self.y = (self.x[:, 0] > 1).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module, **kwargs: Any) -> None:
        self.after_step[state.global_step] = {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_swa_callback_is_the_window_mean_with_batch_norm_recomputed(tmp_path: Path) -> None:
    model = BatchNormNet()
    swa = SWACallback(swa_start="3ba", swa_end="8ba", update_interval="1ba")
    recorder = Recorder()
    data = Data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = EMATrainer(model=model, args=training_args(tmp_path, max_steps=12), train_dataset=data,
                             eval_dataset=data, callbacks=[swa, recorder])  # fmt: skip
        trainer.train()
    assert swa.averager.window_closed and swa.averager.bn_updated and (swa.averager.n_averaged - 1) + 1 == 6
    average = swa.averager.ema_model.state_dict()
    for name in ("first.weight", "first.bias", "norm.weight", "last.weight"):
        expected = torch.stack([recorder.after_step[s][name] for s in range(3, 9)]).double().mean(0).float()
        torch.testing.assert_close(average[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    # momentum None over equal batches: the running mean is the mean of the averaged layer's outputs on all data
    activations = data.x @ average["first.weight"].T + average["first.bias"]
    torch.testing.assert_close(average["norm.running_mean"], activations.mean(0), rtol=1e-5, atol=1e-5)
    assert int(average["norm.num_batches_tracked"]) == len(data) // 4
    # evaluation runs on the averaged model
    with torch.no_grad():
        swa.averager.ema_model.eval()
        expected_loss = F.cross_entropy(swa.averager.ema_model(data.x)["logits"], data.y).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_ema_and_swa_callbacks_are_refused_together(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = EMATrainer(model=BatchNormNet(), args=training_args(tmp_path), train_dataset=Data(),
                             callbacks=[EMACallback(half_life="5ba"), SWACallback()])  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"at most one averaging callback, this one has 2: EMACallback and SWACallback \(EMA and SWA do not compose\)",
    ):
        trainer.train()
