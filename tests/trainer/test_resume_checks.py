"""Resuming never mixes weights silently: a run without the EMA, odd files given as ``load_path``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_loader, make_model
from emakit.algorithms import EMA
from emakit.checkpoint import load_checkpoint_file
from emakit.trainer import Trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


# ---------------------------------------------------------------- resuming without the EMA


def test_resuming_an_ema_checkpoint_without_the_ema_trains_on_from_the_training_weights(tmp_path: Path) -> None:
    # The EMA does not change training, so the training weights of an uninterrupted EMA run are the answer.
    full = Trainer(make_model(0), make_loader(n=32), "2ep", algorithms=[EMA(half_life="2ba")],
                   save_folder=tmp_path, progress_bar=False)  # fmt: skip
    full.fit()
    checkpoint = load_checkpoint_file(tmp_path / "ep1-ba4.pt")
    assert checkpoint["model_weights"] == "published" and "training_weights" in checkpoint["state"]["algorithms"]["EMA"]
    published = checkpoint["state"]["model"]["fc1.weight"]
    training = checkpoint["state"]["algorithms"]["EMA"]["training_weights"]["fc1.weight"]
    assert not torch.equal(published, training)  # the two really differ, so loading the wrong one shows

    with pytest.warns(UserWarning) as record:
        resumed = Trainer(make_model(1), make_loader(n=32), "2ep", algorithms=[], progress_bar=False,
                          load_path=tmp_path / "ep1-ba4.pt")  # fmt: skip
    messages = [str(w.message) for w in record]
    assert any(
        "ep1-ba4.pt' was written with algorithm 'EMA', which this run does not have" in m
        and "training weights stored beside them were loaded" in m
        and "its state is not used" in m
        for m in messages
    ), messages
    assert torch.equal(resumed.state.model.state_dict()["fc1.weight"], training)
    resumed.fit()
    expected = weights(full)
    for name, value in weights(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_resuming_before_the_ema_started_without_the_ema_warns_that_its_state_is_unused(tmp_path: Path) -> None:
    run = Trainer(make_model(0), make_loader(n=32), "1ep", algorithms=[EMA(half_life="2ba", ema_start="10ba")],
                  save_folder=tmp_path, progress_bar=False)  # fmt: skip
    run.fit()
    assert "training_weights" not in load_checkpoint_file(tmp_path / "ep1-ba4.pt")["state"]["algorithms"]["EMA"]
    with pytest.warns(UserWarning, match=r"holds state for algorithm 'EMA', which this run does not have: .*not used"):
        resumed = Trainer(make_model(1), make_loader(n=32), "2ep", progress_bar=False,
                          load_path=tmp_path / "ep1-ba4.pt")  # fmt: skip
    expected = weights(run)
    for name, value in weights(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_resuming_with_the_ema_gives_no_warning(tmp_path: Path) -> None:
    Trainer(make_model(0), make_loader(n=32), "1ep", algorithms=[EMA(half_life="2ba")], save_folder=tmp_path,
            progress_bar=False).fit()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(make_model(0), make_loader(n=32), "2ep", algorithms=[EMA(half_life="2ba")], progress_bar=False,
                load_path=tmp_path / "ep1-ba4.pt")  # fmt: skip
