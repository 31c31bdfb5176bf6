"""emakit.distributed in one process: launch detection, argument checks, data splitting, DCP round trips, export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from conftest import make_loader, make_model
from emakit import EMA, Trainer
from emakit.distributed import (
    all_reduce_sum,
    build_sharded_checkpoint,
    export_ema_weights,
    is_sharded_checkpoint,
    launched_by_torchrun,
    note_peer_failure,
    read_sharded_checkpoint,
    resolve_parallelism,
    save_sharded_checkpoint,
    set_sampler_epoch,
    shard_dataloader,
)

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_torchrun_launch_is_detected_from_its_environment_variables() -> None:
    assert launched_by_torchrun(TORCHRUN_ENV)
    for missing in TORCHRUN_ENV:
        assert not launched_by_torchrun({k: v for k, v in TORCHRUN_ENV.items() if k != missing})
    assert not launched_by_torchrun({})


def test_parallelism_defaults_to_ddp_only_for_several_processes() -> None:
    assert resolve_parallelism(None, distributed=True, world_size=2) == "ddp"
    assert resolve_parallelism(None, distributed=True, world_size=1) is None
    assert resolve_parallelism(None, distributed=False, world_size=1) is None
    assert resolve_parallelism("fsdp", distributed=True, world_size=2) == "fsdp"


@pytest.mark.usefixtures("no_torchrun")
def test_trainer_rejects_bad_parallelism_and_timeouts() -> None:
    with pytest.raises(ValueError, match=r"parallelism must be None, 'ddp' or 'fsdp', got 'zero'"):
        Trainer(make_model(), make_loader(), "1ba", parallelism="zero", progress_bar=False)
    with pytest.raises(ValueError, match=r"parallelism='fsdp' needs a torch.distributed launch: run under torchrun"):
        Trainer(make_model(), make_loader(), "1ba", parallelism="fsdp", progress_bar=False)
    with pytest.raises(ValueError, match=r"dist_timeout must be greater than 0 seconds, got -1"):
        Trainer(make_model(), make_loader(), "1ba", dist_timeout=-1, progress_bar=False)
    with pytest.raises(TypeError, match=r"dist_timeout must be a number of seconds or a datetime.timedelta"):
        Trainer(make_model(), make_loader(), "1ba", dist_timeout="5", progress_bar=False)  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_torchrun")
def test_single_process_trainer_is_not_wrapped_or_split() -> None:
    model, loader = make_model(), make_loader()
    trainer = Trainer(model, loader, "1ba", progress_bar=False)
    assert trainer.parallelism is None
    assert (trainer.state.rank, trainer.state.world_size) == (0, 1)
    assert trainer.state.model is model and trainer.state.train_dataloader is loader


def indices_of(loader: DataLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch[0]]


def test_dataloader_is_split_across_ranks_keeping_its_settings() -> None:
    data = TensorDataset(torch.arange(20))

    def collate(batch: list[tuple[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.stack([b[0] for b in batch])]

    loader = DataLoader(data, batch_size=3, shuffle=True, drop_last=True, collate_fn=collate)
    assert shard_dataloader(loader, world_size=1, rank=0, seed=5) is loader
    parts = [shard_dataloader(loader, world_size=2, rank=r, seed=5) for r in range(2)]
    for part in parts:
        assert isinstance(part, DataLoader) and isinstance(part.sampler, DistributedSampler)
        assert (part.batch_size, part.drop_last, part.collate_fn) == (3, True, collate)
        assert part.sampler.shuffle and part.sampler.seed == 5
        assert len(part) == 3  # 10 samples per rank in batches of 3, the last one dropped
    full = [
        shard_dataloader(DataLoader(data, batch_size=10, shuffle=True), world_size=2, rank=r, seed=5) for r in (0, 1)
    ]
    epoch0 = [indices_of(p) for p in full]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(20))  # the ranks partition the data
    for p in full:
        set_sampler_epoch(p, 1)
    epoch1 = [indices_of(p) for p in full]
    assert epoch1 != epoch0 and sorted(epoch1[0] + epoch1[1]) == list(range(20))
    for p in full:
        set_sampler_epoch(p, 0)
    assert [indices_of(p) for p in full] == epoch0  # seeded: the same epoch gives the same order


def test_loaders_that_cannot_be_split_are_left_alone_with_a_warning() -> None:
    data = TensorDataset(torch.arange(8))
    already = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    assert shard_dataloader(already, world_size=2, rank=1, seed=0) is already
    custom = DataLoader(data, batch_size=2, sampler=list(range(8)))
    with pytest.warns(UserWarning, match="every rank reads all of it"):
        assert shard_dataloader(custom, world_size=2, rank=0, seed=0, what="train_dataloader") is custom
    batches = [[0, 1], [2, 3]]
    with pytest.warns(UserWarning, match="cannot be split"):
        assert shard_dataloader(batches, world_size=2, rank=0, seed=0) is batches
    sequential = shard_dataloader(DataLoader(data, batch_size=2), world_size=2, rank=0, seed=0)
    assert isinstance(sequential, DataLoader) and not sequential.sampler.shuffle  # type: ignore[attr-defined]
    assert isinstance(DataLoader(data).sampler, SequentialSampler)


def test_metric_sums_pass_through_without_a_process_group() -> None:
    assert all_reduce_sum([1.5, 2, 0], torch.device("cpu")) == [1.5, 2.0, 0.0]


def test_collective_failures_get_a_note_naming_the_likely_cause() -> None:
    error = RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:10673")
    note_peer_failure(error, rank=0, world_size=2)
    assert "another rank died or stopped answering" in "".join(getattr(error, "__notes__", []))
    unrelated = RuntimeError("shape mismatch")
    note_peer_failure(unrelated, rank=0, world_size=2)
    single = RuntimeError("Timed out waiting 5000ms")
    note_peer_failure(single, rank=0, world_size=1)
    assert not hasattr(unrelated, "__notes__") and not hasattr(single, "__notes__")


# ------------------------------------------------------------------------------------------ DCP in one process
def make_trainer(**kwargs: object) -> tuple[Trainer, EMA]:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    ema = EMA(half_life="3ba")
    loader = DataLoader(make_loader().dataset, batch_size=8, shuffle=True)
    trainer = Trainer(
        model,
        loader,
        "2ep",
        algorithms=[ema],
        optimizers=optimizer,
        schedulers=scheduler,
        seed=3,
        progress_bar=False,
        **kwargs,  # type: ignore[arg-type]
    )
    return trainer, ema


class StopAt(Exception):
    pass


@pytest.mark.usefixtures("no_torchrun")
def test_dcp_checkpoint_round_trip_resumes_exactly_in_one_process(tmp_path: Path) -> None:
    uninterrupted, ema = make_trainer()
    uninterrupted.fit()

    first, _ = make_trainer()
    first.state.max_duration = type(first.state.max_duration).coerce("11ba", "max_duration")
    first.fit()  # stops inside epoch 2 (8 batches per epoch)
    path = save_sharded_checkpoint(build_sharded_checkpoint(first.state, publish=True), tmp_path / "ck")
    assert is_sharded_checkpoint(path) and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    resumed, resumed_ema = make_trainer(load_path=path)
    assert resumed.state.timestamp.batch == 11
    resumed.fit()
    for name, value in uninterrupted.state.model.state_dict().items():
        assert torch.equal(resumed.state.model.state_dict()[name], value), name
    for name, value in ema.ema_tensors.items():
        assert torch.equal(resumed_ema.ema_tensors[name], value), name


class Trap:
    """Unpickling it would call ``os.getcwd``: a stand-in for code a hostile checkpoint could run."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_non_tensor_entries_are_read_weights_only(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"format": "emakit.checkpoint", "trap": Trap()}, checkpoint_id=tmp_path / "ck", no_dist=True)
    with pytest.raises(ValueError, match=r"was refused for safety: it holds objects other than tensors"):
        read_sharded_checkpoint(tmp_path / "ck")
    assert read_sharded_checkpoint(tmp_path / "ck", keep=lambda keys: keys[0] == "format") == {
        "format": "emakit.checkpoint"
    }


# ------------------------------------------------------------------------------------------ export
@pytest.mark.usefixtures("no_torchrun")
def test_ema_export_from_a_trainer_and_from_checkpoints_loads_into_a_plain_model(tmp_path: Path) -> None:
    trainer, ema = make_trainer(save_folder=tmp_path / "ck")
    trainer.fit()
    expected = ema.ema_model.state_dict()
    trainer.save_checkpoint(tmp_path / "training.pt")  # training weights as the model, EMA in its state
    sources = [trainer, ema, tmp_path / "ck" / "latest.pt", tmp_path / "training.pt"]
    for i, source in enumerate(sources):
        path = export_ema_weights(source, tmp_path / f"ema{i}.pt")
        assert path is not None
        model = make_model()
        model.load_state_dict(torch.load(path, weights_only=True))
        for name, value in expected.items():
            assert torch.equal(model.state_dict()[name], value), (source, name)


@pytest.mark.usefixtures("no_torchrun")
def test_ema_export_refuses_sources_without_an_average(tmp_path: Path) -> None:
    trainer = Trainer(make_model(), make_loader(), "1ba", progress_bar=False, save_folder=tmp_path / "ck")
    trainer.fit()
    with pytest.raises(ValueError, match="exactly one averager \\(EMA or SWA\\), it has 0"):
        export_ema_weights(trainer, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="holds no EMA weights"):
        export_ema_weights(tmp_path / "ck" / "latest.pt", tmp_path / "x.pt")
    with pytest.raises(TypeError, match="source must be a Trainer, an averager \\(EMA, SWA\\), a checkpoint path"):
        export_ema_weights(42, tmp_path / "x.pt")
    late = EMA(half_life="2ba", ema_start="5ba")
    Trainer(make_model(), make_loader(), "5ba", algorithms=[late], progress_bar=False)
    with pytest.raises(RuntimeError, match="has not started"):
        export_ema_weights(late, tmp_path / "x.pt")
