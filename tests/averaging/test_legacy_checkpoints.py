"""States and checkpoints written by emakit before the one-averager layout still resume, bit for bit.

The files in tests/data/legacy were written by tests/data/legacy/make_legacy.py on the code of that time,
each with the average that code reached after continuing the run: resuming here must reach the same bits.
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
    model = make_model(0)
    model.load_state_dict(saved["model"])
    averager = make()
    averager.attach(model, max_duration="40ba")
    averager.load_state_dict(saved["averager"])
    make_legacy.loop_steps(model, averager, 14, 30)
    expected = torch.load(DATA / f"{name}-expected.pt", weights_only=True)
    assert set(averager.ema_tensors) == set(expected)
    for key, value in expected.items():
        assert torch.equal(averager.ema_tensors[key], value), key


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("trainer-ema", lambda: EMA(half_life="5ba")),
        ("trainer-swa", lambda: SWA(swa_start="2ep", swa_end="5ep", swa_lr=0.02, anneal_time="3ba")),
    ],
)
def test_an_old_trainer_checkpoint_resumes_bitwise(name: str, make: Callable[[], Any]) -> None:
    averager = make()
    trainer = Trainer(make_model(), make_loader(shuffle=True), "6ep", algorithms=[averager], progress_bar=False,
                      seed=1, load_path=DATA / f"{name}-ep3.pt")  # fmt: skip
    trainer.fit()
    expected = torch.load(DATA / f"{name}-expected.pt", weights_only=True)
    for key, value in expected["average"].items():
        assert torch.equal(averager.ema_tensors[key], value), key
    for key, value in expected["model"].items():
        assert torch.equal(trainer.state.model.state_dict()[key], value), key
