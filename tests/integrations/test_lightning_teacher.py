"""The EMA as a live teacher under Lightning: its output in the loss every step, and an exact resume.

A self-distillation step: the student's loss adds the distance to the teacher's (``callback.averager.ema_model``)
softmax on the same batch, with the teacher's momentum on a cosine ramp (``CosineMomentum``). Stopped after an
epoch and resumed from the checkpoint, the run must end bitwise where an uninterrupted one does: the student, the
average (the teacher) and the clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import torch
from _lightning_worker import Net, make_loader, make_trainer, weights
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from emakit.averaging import CosineMomentum
from emakit.integrations.lightning import EMACallback


class Distilled(Net):
    """Net whose loss adds the distance to the EMA teacher's softmax, once the teacher exists."""

    def __init__(self) -> None:
        super().__init__(batchnorm=False)
        self.teacher_of: EMACallback | None = None
        self.teacher_used = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        averager = self.teacher_of.averager if self.teacher_of is not None else None
        if averager is not None and averager.started:
            teacher = averager.ema_model
            assert not any(p.requires_grad for p in teacher.parameters())
            with torch.no_grad():
                target = teacher(x).softmax(-1)
            loss = loss + nn.functional.cross_entropy(logits, target)
            self.teacher_used += 1
        return loss


def distilled(seed: int) -> tuple[Distilled, EMACallback]:
    torch.manual_seed(seed)
    module = Distilled()
    callback = EMACallback(schedule=CosineMomentum(base=0.8, final=1.0))
    module.teacher_of = callback
    return module, callback


def test_a_run_with_the_teacher_in_the_loss_resumes_bitwise(tmp_path: Path) -> None:
    options = {"max_epochs": 3, "enable_checkpointing": True}

    def checkpoints(folder: Path) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)

    whole, whole_cb = distilled(seed=0)
    make_trainer([whole_cb, checkpoints(tmp_path / "whole")], **options).fit(whole, make_loader())
    assert whole.teacher_used == 17  # 18 steps; the first one starts the average

    resumed, resumed_cb = distilled(seed=123)  # other initial weights: all must come from the checkpoint
    trainer = make_trainer([resumed_cb, checkpoints(tmp_path / "resumed")], **options)
    trainer.fit(resumed, make_loader(), ckpt_path=tmp_path / "whole" / "epoch=0.ckpt")
    assert resumed.teacher_used == 12  # epochs 2 and 3

    for name, value in weights(whole).items():
        assert torch.equal(weights(resumed)[name], value), name
    for name, value in whole_cb.averager.ema_tensors.items():
        assert torch.equal(resumed_cb.averager.ema_tensors[name], value), name
    assert resumed_cb.averager.n_averaged == whole_cb.averager.n_averaged == 18
    assert resumed_cb.averager.timestamp == whole_cb.averager.timestamp
