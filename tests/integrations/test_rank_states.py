"""Which checkpoint file holds an averager's state (emakit.integrations.rank_states), in one process.

The per-rank ZeRO-3 files are written and resumed for real on 2 ranks by tests/zero/test_zero_trainer.py;
here: the names, and the refusals of a folder written by another number of ranks or another ZeRO stage, also
through a real Transformers Trainer resuming before any step.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from emakit import EMA
from emakit.integrations.rank_states import (
    load_ema_state,
    partition_state_name,
    save_ema_state,
    state_to_load,
    state_to_save,
)


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A process group of one rank (a ZeRO-3 partition's size is read from it)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def attached(zero3: bool = False) -> EMA:
    model = nn.Linear(3, 2)
    if zero3:  # the attributes DeepSpeed ZeRO-3 gives its parameters (one rank holding them whole)
        for p in model.parameters():
            p.ds_tensor = p.detach().reshape(-1).clone()  # type: ignore[attr-defined]
            p.ds_shape = p.shape  # type: ignore[attr-defined]
            p.ds_numel = p.numel()  # type: ignore[attr-defined]
    ema = EMA()
    ema.attach(model)
    return ema


def test_a_whole_state_is_one_file_written_by_the_saving_rank(tmp_path: Path) -> None:
    ema = attached()
    assert state_to_save(ema, tmp_path, "emakit_ema.pt", should_save=True) == tmp_path / "emakit_ema.pt"
    assert state_to_save(ema, tmp_path, "emakit_ema.pt", should_save=False) is None
    assert state_to_load(ema, tmp_path, "emakit_ema.pt") is None
    (tmp_path / "emakit_ema.pt").touch()
    assert state_to_load(ema, tmp_path, "emakit_ema.pt") == tmp_path / "emakit_ema.pt"


def test_zero3_partitions_go_to_each_ranks_own_file(tmp_path: Path, one_rank: None) -> None:
    ema = attached(zero3=True)
    for should_save in (True, False):  # every rank saves its partitions
        assert state_to_save(ema, tmp_path, "emakit_ema.pt", should_save) == tmp_path / "emakit_ema_rank0.pt"
    assert partition_state_name(3) == "emakit_ema_rank3.pt"
    assert state_to_load(ema, tmp_path, "emakit_ema.pt") is None
    (tmp_path / "emakit_ema_rank0.pt").touch()
    assert state_to_load(ema, tmp_path, "emakit_ema.pt") == tmp_path / "emakit_ema_rank0.pt"


@pytest.mark.parametrize("zero3", [False, True])
def test_partitions_of_another_number_of_ranks_are_refused(tmp_path: Path, zero3: bool, one_rank: None) -> None:
    for rank in (0, 1):
        (tmp_path / partition_state_name(rank)).touch()
    with pytest.raises(ValueError, match=r"partitions of 2 rank\(s\) .*but this run has 1 \(the world size"):
        state_to_load(attached(zero3), tmp_path, "emakit_ema.pt")


def test_states_of_the_other_zero_stage_are_refused(tmp_path: Path, one_rank: None) -> None:
    (tmp_path / partition_state_name(0)).touch()
    with pytest.raises(ValueError, match="this run's model is not partitioned by ZeRO-3"):
        state_to_load(attached(), tmp_path, "emakit_ema.pt")
    (tmp_path / partition_state_name(0)).unlink()
    (tmp_path / "emakit_ema.pt").touch()
    with pytest.raises(ValueError, match="holds a whole EMA written without DeepSpeed ZeRO-3"):
        state_to_load(attached(zero3=True), tmp_path, "emakit_ema.pt")


def test_the_trainer_refuses_a_checkpoint_of_two_ranks_before_any_step(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from _hf_common import StopAt, TokenData, tiny_model, training_args

    from emakit.integrations.transformers import EMACallback, EMATrainer

    def trainer(*callbacks: object) -> EMATrainer:
        args = training_args(tmp_path, save_strategy="steps", save_steps=2)
        return EMATrainer(model=tiny_model(), args=args, train_dataset=TokenData(40), callbacks=list(callbacks))

    trainer(EMACallback(), StopAt(2)).train()
    folder = tmp_path / "checkpoint-2"
    for rank in (0, 1):  # as two ZeRO-3 ranks would have left it
        shutil.copy(folder / "emakit_ema.pt", folder / partition_state_name(rank))
    (folder / "emakit_ema.pt").unlink()
    resumed = trainer(EMACallback())
    with pytest.raises(ValueError, match=r"partitions of 2 rank\(s\).*but this run has 1"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2


def test_resuming_from_a_folder_without_the_per_rank_states_names_them(tmp_path: Path, one_rank: None) -> None:
    pytest.importorskip("transformers")
    from emakit.integrations.transformers import EMACallback

    callback = EMACallback()
    callback.averager = attached(zero3=True)
    with pytest.warns(UserWarning, match=r"which holds no emakit_ema_rank0\.pt \(one per rank, ZeRO-3\)"):
        callback._resume(tmp_path, 3)
    callback.averager = attached()
    with pytest.warns(UserWarning, match=r"which holds no emakit_ema\.pt: the EMA starts a fresh average"):
        callback._resume(tmp_path, 3)


def test_save_and_load_ema_state_round_trip_a_whole_average(tmp_path: Path) -> None:
    ema = attached()
    for _ in range(3):
        with torch.no_grad():
            for p in ema.model.parameters():
                p.add_(1.0)
        ema.step()
    assert save_ema_state(ema, tmp_path / "ckpt") == tmp_path / "ckpt" / "emakit_ema.pt"
    with pytest.raises(FileExistsError, match="overwrite"):
        save_ema_state(ema, tmp_path / "ckpt")
    resumed = EMA()
    resumed.attach(ema.model)
    assert load_ema_state(resumed, tmp_path / "ckpt") == tmp_path / "ckpt" / "emakit_ema.pt"
    assert resumed.n_averaged == ema.n_averaged == 3
    for (name, mine), theirs in zip(resumed.state_dict()["ema"].items(), ema.state_dict()["ema"].values(), strict=True):
        assert torch.equal(mine, theirs), name


def test_load_ema_state_names_the_files_it_expects(tmp_path: Path, one_rank: None) -> None:
    with pytest.raises(FileNotFoundError, match=r"holds no EMA state: expected emakit_ema\.pt, as save_ema_state"):
        load_ema_state(attached(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected emakit_ema_rank0\.pt \(one per rank, ZeRO-3\)"):
        load_ema_state(attached(zero3=True), tmp_path)
