"""States and checkpoints written by emakit before the one-averager layout still resume.

The files in tests/data/legacy were written by tests/data/legacy/make_legacy.py on the code of that time, each
with the average that code reached after continuing the run. The bits of training arithmetic differ between CPUs
(the old code's own rerun on another CPU differed by up to 1.2e-7), so the any-loop cases replay the recorded
training weights instead of training: resumed from the old state, today's averager must equal bit for bit today's
averager run uninterrupted over the same weights, and the old code's continuation to fp32 rounding (bit for bit on
the CPU that wrote the files). emakit's Trainer trains as it resumes, so its checkpoints are checked by the batches
the resumed fit runs, the models the average holds and, after three more epochs, the old code's weights to fp32
rounding.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_loader, make_model
from emakit import EMA, SWA, Trainer
from emakit.core.callback import Callback

DATA = Path(__file__).parents[1] / "data" / "legacy"
_spec = importlib.util.spec_from_file_location("make_legacy", DATA / "make_legacy.py")
assert _spec is not None and _spec.loader is not None
make_legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_legacy)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("ema-loop", lambda: EMA(half_life="3ba", ema_start="2ba")),
        ("ema-several", lambda: EMA(half_life=["3ba", "9ba"])),
        ("ema-sigma-rel", lambda: EMA(sigma_rel=[0.05, 0.1])),
        ("ema-warmup", lambda: EMA(half_life="20ba", warmup=True)),
        ("swa-loop", lambda: SWA(swa_start="5ba", swa_end="25ba", update_interval="2ba")),
    ],
)
def test_an_old_any_loop_state_resumes_bitwise(name: str, make: Callable[[], Any]) -> None:
    saved = torch.load(DATA / f"{name}.pt", weights_only=True)
    recorded = torch.load(DATA / f"{name}-weights.pt", weights_only=True)
    assert len(recorded) == 30
    torch.testing.assert_close(recorded[13], saved["model"], rtol=0, atol=0)

    model = make_model(0)
    model.load_state_dict(saved["model"])
    resumed = make()
    resumed.attach(model, max_duration="40ba")
    resumed.load_state_dict(saved["averager"])
    replay(model, resumed, recorded, 14, 30)

    whole_model = make_model(0)
    whole = make()
    whole.attach(whole_model, max_duration="40ba")
    replay(whole_model, whole, recorded, 0, 30)

    expected = torch.load(DATA / f"{name}-expected.pt", weights_only=True)
    assert set(resumed.ema_tensors) == set(whole.ema_tensors) == set(expected)
    assert resumed.n_averaged == whole.n_averaged
    for key, value in expected.items():
        assert torch.equal(resumed.ema_tensors[key], whole.ema_tensors[key]), key
        torch.testing.assert_close(resumed.ema_tensors[key], value, rtol=2.4e-7, atol=1.2e-7, msg=key)


def replay(
    model: torch.nn.Module, averager: Any, recorded: list[dict[str, torch.Tensor]], start: int, stop: int
) -> None:
    """The recorded run's steps ``start..stop-1``: its weights written into ``model``, then the averager's step and,
    every fourth step, its epoch end, as make_legacy.loop_steps did."""
    for i in range(start, stop):
        model.load_state_dict(recorded[i])
        averager.step()
        if (i + 1) % 4 == 0:
            averager.epoch_end()


@pytest.mark.parametrize(
    ("name", "make", "models"),
    [
        ("trainer-ema", lambda: EMA(half_life="5ba"), 48),  # every batch of 6 epochs of 8
        ("trainer-swa", lambda: SWA(swa_start="2ep", swa_end="5ep", swa_lr=0.02, anneal_time="3ba"), 4),  # ends of 2-5
    ],
)
def test_an_old_trainer_checkpoint_resumes(name: str, make: Callable[[], Any], models: int) -> None:
    averager = make()
    batches = CountBatches()
    trainer = Trainer(make_model(), make_loader(shuffle=True), "6ep", algorithms=[averager], progress_bar=False,
                      seed=1, load_path=DATA / f"{name}-ep3.pt", callbacks=[batches])  # fmt: skip
    trainer.fit()
    assert batches.count == 24  # epochs 4-6 only: the fit resumed at the end of epoch 3
    assert averager.n_averaged == models
    # Training arithmetic differs between CPUs by a few ulps (1.2e-7 measured); a resume that lost the clock, the
    # optimizer or the average is off by orders of magnitude more.
    expected = torch.load(DATA / f"{name}-expected.pt", weights_only=True)
    for key, value in expected["average"].items():
        torch.testing.assert_close(averager.ema_tensors[key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in expected["model"].items():
        torch.testing.assert_close(trainer.state.model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


class CountBatches(Callback):
    """Counts the batches a fit runs."""

    def __init__(self) -> None:
        self.count = 0

    def batch_end(self, state: Any, logger: Any) -> None:
        self.count += 1
