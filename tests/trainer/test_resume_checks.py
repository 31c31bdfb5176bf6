"""Resuming never mixes weights silently: a run without the EMA, odd files given as ``load_path``."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_loader, make_model
from emakit import EMA
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


# ---------------------------------------------------------------- files that are not checkpoints


def test_a_folder_as_load_path_says_what_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        Trainer(make_model(0), make_loader(), "1ep", load_path=folder, progress_bar=False)
    message = str(info.value)
    assert f"checkpoint {str(folder)!r} is a folder, not a checkpoint" in message
    assert "ep{E}-ba{B}.pt" in message and "DCP checkpoint directory" in message
    assert f"save_folder={str(folder)!r} with load_path='latest'" in message
    assert "does not exist" not in message


def test_a_safetensors_file_is_named_as_weights_not_a_run(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    trainer = Trainer(make_model(0), make_loader(), "1ep", algorithms=[EMA(half_life="2ba")], progress_bar=False)
    trainer.fit()
    for name in ("ema.safetensors", "ema.pt"):  # recognised by its bytes, whatever its name
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in trainer.state.model.state_dict().items()}, str(path))
        with pytest.raises(ValueError) as info:
            Trainer(make_model(0), make_loader(), "1ep", load_path=path, progress_bar=False)
        message = str(info.value)
        assert f"checkpoint {str(path)!r} is a safetensors file: it holds weights only" in message
        assert "safetensors.torch.load_file(path)" in message and "torch.load(" not in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=3000), zip_head=st.booleans())
def test_random_bytes_are_called_damaged_never_retry_with_weights_only_false(
    tmp_path: Path, data: bytes, zip_head: bool
) -> None:
    path = tmp_path / "ep3-ba12.pt"
    path.write_bytes((b"PK\x03\x04" if zip_head else b"") + data)
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "weights_only=False" not in message and "will likely succeed" not in message, message
    assert "truncated or damaged" in message or "is empty" in message or "not an emakit checkpoint" in message


def test_random_bytes_name_the_unpicklers_reason(tmp_path: Path) -> None:
    path = tmp_path / "ep3-ba12.pt"
    path.write_bytes(random.Random(0).randbytes(4000))
    with pytest.raises(
        ValueError,
        match=r"'.*ep3-ba12.pt' is truncated or damaged \(4,000 bytes\): torch.load failed with 'Unsupported operand \d+'\. The write",
    ):
        load_checkpoint_file(path)


# ---------------------------------------------------------------- one step, one checkpoint


class NoLength:
    """An iterable of batches without ``len``: the Trainer cannot know which batch ends an epoch."""

    def __init__(self, n: int) -> None:
        self.loader = make_loader(n=n)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.loader)


@pytest.mark.parametrize("sized", [True, False])
def test_a_step_at_the_end_of_the_last_epoch_is_saved_once(tmp_path: Path, sized: bool) -> None:
    # 5 batches an epoch, a checkpoint every 10 batches: batch 20 is both a batch checkpoint and the end.
    loader = make_loader(n=40) if sized else NoLength(40)
    trainer = Trainer(make_model(0), loader, "4ep", algorithms=[EMA(half_life="1ep")],
                      save_folder=tmp_path, save_interval="10ba", progress_bar=False)  # fmt: skip
    trainer.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ep1-ba10.pt", "ep4-ba20.pt", "latest.pt"], names
    assert (tmp_path / "latest.pt").resolve().name == "ep4-ba20.pt"
    final = load_checkpoint_file(tmp_path / "ep4-ba20.pt")
    assert final["state"]["timestamp"]["epoch"] == 4 and final["state"]["callbacks"]["CheckpointSaver"]["saved"] == [
        "ep1-ba10.pt",
        "ep4-ba20.pt",
    ]
    # the final file holds the state after the last epoch's end: the EMA's epoch update included
    assert final["state"]["algorithms"]["EMA"]["num_updates"] == (trainer.state.algorithms[0].averager.n_averaged - 1)
