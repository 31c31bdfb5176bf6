"""``ema.state_dict()`` follows torch's convention: the average's tensors are references to the live storage,
the counters plain numbers. A state kept in memory must be deep-copied, as the own-loop guide does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from docs._blocks import python_blocks
from emakit import EMA

ROOT = Path(__file__).resolve().parents[2]


def train(namespace: dict, steps: int) -> None:
    model, opt, ema = namespace["model"], namespace["opt"], namespace["ema"]
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        F.cross_entropy(model(torch.randn(8, 4, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        ema.step()


def test_state_dict_tensors_are_the_live_average_and_a_deepcopy_is_a_consistent_snapshot() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    namespace = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1), "ema": EMA(half_life="2ba")}
    ema: EMA = namespace["ema"]  # type: ignore[assignment]
    ema.attach(model)
    train(namespace, 3)
    live, kept = ema.state_dict(), copy.deepcopy(ema.state_dict())
    at_save = {k: v.clone() for k, v in ema.ema_tensors.items()}
    train(namespace, 3)
    assert live["num_updates"] == kept["num_updates"] == 2 and (ema.n_averaged - 1) == 5
    for name, value in ema.ema_tensors.items():
        assert live["ema"][name].data_ptr() == value.data_ptr()  # a reference, as torch's state_dict
        assert torch.equal(kept["ema"][name], at_save[name])  # the copy is what the counters describe


def test_the_own_loop_guide_keeps_a_consistent_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    block = next(code for code in python_blocks(ROOT / "docs/guides/own-loop.md") if "ema.state_dict()" in code)
    namespace: dict = {"__name__": "own_loop"}
    exec(compile(block, "docs/guides/own-loop.md", "exec"), namespace)
    checkpoint = namespace["checkpoint"]
    at_save = {k: v.clone() for k, v in namespace["ema"].ema_tensors.items()}
    train(namespace, 5)
    for name, value in at_save.items():
        assert torch.equal(checkpoint["ema"]["ema"][name], value), name
    resumed = EMA(half_life="20ba")
    resumed.attach(copy.deepcopy(namespace["model"]))
    resumed.load_state_dict(checkpoint["ema"])
    assert (resumed.n_averaged - 1) == checkpoint["ema"]["num_updates"]
    for name, value in at_save.items():
        assert torch.equal(resumed.ema_tensors[name], value), name
