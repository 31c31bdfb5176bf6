"""The Trainer: events, evaluation on EMA weights, checkpoints, resume equivalence."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_loader, make_model
from emakit import EMA
from emakit.callbacks import CheckpointSaver
from emakit.core import Algorithm, Callback, Event
from emakit.trainer import Trainer, evaluate


class EventLog(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def run_event(self, event: Event, state: Any, logger: Any) -> None:
        self.events.append(event.value)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fit(max_duration: str = "2ep", ema: EMA | None = None, loader: Any = None, **kwargs: Any) -> tuple[Trainer, EMA]:
    ema = ema or EMA(half_life="3ba")
    trainer = Trainer(
        make_model(0),
        loader if loader is not None else make_loader(n=32),
        max_duration,
        algorithms=[ema],
        progress_bar=False,
        **kwargs,
    )
    trainer.fit()
    return trainer, ema


# ---------------------------------------------------------------- events


def test_events_fire_in_documented_order() -> None:
    log = EventLog()
    Trainer(
        make_model(0),
        make_loader(n=16),
        "2ep",
        callbacks=[log],
        eval_dataloader=make_loader(n=8),
        eval_interval="1ep",
        progress_bar=False,
    ).fit()
    batch = ["batch_start", "batch_end", "batch_checkpoint"]
    epoch = [
        "epoch_start",
        *batch,
        *batch,
        "epoch_end",
        "eval_start",
        "eval_end",
        "epoch_checkpoint",
    ]
    assert log.events == ["init", "fit_start", *epoch, *epoch, "fit_end"]


def test_algorithms_run_before_callbacks() -> None:
    order: list[str] = []

    class Alg(Algorithm):
        def match(self, event: Event, state: Any) -> bool:
            return event == Event.BATCH_END

        def apply(self, event: Event, state: Any, logger: Any) -> None:
            order.append("algorithm")

    class Cb(Callback):
        def batch_end(self, state: Any, logger: Any) -> None:
            order.append("callback")

    Trainer(make_model(0), make_loader(n=8), "1ba", algorithms=[Alg()], callbacks=[Cb()], progress_bar=False).fit()
    assert order == ["algorithm", "callback"]


def test_max_duration_units() -> None:
    for length, batches, samples in (("3ba", 3, 24), ("2ep", 8, 64), ("20sp", 3, 24)):
        trainer = Trainer(make_model(0), make_loader(n=32), length, progress_bar=False)
        trainer.fit()
        assert trainer.state.timestamp.batch == batches, length
        assert trainer.state.timestamp.sample == samples, length


def test_model_with_its_own_loss() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(0)
            self.calls = 0

        def forward(self, batch: Any) -> torch.Tensor:
            return self.net(batch[0])

        def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
            self.calls += 1
            return F.mse_loss(outputs, F.one_hot(batch[1], 3).float())

    model = WithLoss()
    trainer = Trainer(model, make_loader(n=16), "1ep", progress_bar=False, loss_fn=lambda *_: 1 / 0)
    trainer.fit()
    assert model.calls == 2


def test_train_and_eval_modes() -> None:
    modes: list[tuple[str, bool]] = []

    class Mode(Callback):
        def batch_start(self, state: Any, logger: Any) -> None:
            modes.append(("train", state.model.training))

        def eval_start(self, state: Any, logger: Any) -> None:
            modes.append(("eval_start", state.model.training))

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(("forward", self.training))
            return self.net(x)

    Trainer(Spy(), make_loader(n=8), "1ep", callbacks=[Mode()], eval_dataloader=make_loader(n=8),
            progress_bar=False).fit()  # fmt: skip
    assert modes == [("train", True), ("forward", True), ("eval_start", True), ("forward", False)]


# ---------------------------------------------------------------- evaluation on EMA weights


def test_evaluation_runs_on_ema_weights_and_training_is_untouched() -> None:
    seen: list[dict[str, torch.Tensor]] = []

    class AtEval(Callback):
        def __init__(self, ema: EMA) -> None:
            self.ema = ema

        def eval_start(self, state: Any, logger: Any) -> None:
            if self.ema.started:
                seen.append(weights(state.model))
                for name, value in state.model.state_dict().items():
                    assert torch.equal(value, self.ema.ema_tensors[name].to(value.dtype)), name

    ema = EMA(half_life="3ba")
    trainer = Trainer(
        make_model(0),
        make_loader(n=32),
        "2ep",
        algorithms=[ema],
        callbacks=[AtEval(ema)],
        eval_dataloader=make_loader(n=16, seed=1),
        eval_interval="1ba",
        progress_bar=False,
    )
    trainer.fit()
    assert len(seen) == 8
    # the logged metrics are those of the EMA model
    last = [r for r in trainer.metrics.history if "eval/loss" in r][-1]
    assert last["eval/loss"] == pytest.approx(evaluate(ema.ema_model, make_loader(n=16, seed=1))["eval/loss"])

    # training is bit-for-bit the same as a run that never evaluated
    plain, plain_ema = fit("2ep")
    assert_bitwise_equal(weights(trainer.state.model), weights(plain.state.model))
    assert_bitwise_equal(ema.ema_tensors, plain_ema.ema_tensors)


def test_eval_before_ema_start_uses_training_weights() -> None:
    ema = EMA(half_life="3ba", ema_start="1ep")
    trainer = Trainer(make_model(0), make_loader(n=32), "1ep", algorithms=[ema], progress_bar=False,
                      eval_dataloader=make_loader(n=16))  # fmt: skip
    metrics = trainer.eval()
    assert metrics["eval/loss"] == pytest.approx(evaluate(trainer.state.model, make_loader(n=16))["eval/loss"])
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0


def test_eval_method_swaps_and_restores() -> None:
    trainer, ema = fit("1ep", eval_dataloader=make_loader(n=16))
    before = weights(trainer.state.model)
    metrics = trainer.eval()
    assert metrics["eval/loss"] == pytest.approx(evaluate(ema.ema_model, make_loader(n=16))["eval/loss"])
    assert_bitwise_equal(weights(trainer.state.model), before)
    assert not ema.ema_weights_active


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_saver_publishes_ema_weights(tmp_path: Path) -> None:
    trainer, ema = fit("1ep", save_folder=tmp_path, save_interval="2ba")
    files = sorted(p.name for p in tmp_path.iterdir())
    # batch 4 was saved before EPOCH_END as ep0-ba4; the final state of that step, ep1-ba4, replaced it
    assert files == ["ep0-ba2.pt", "ep1-ba4.pt", "latest.pt"]
    assert (tmp_path / "latest.pt").resolve().name == "ep1-ba4.pt"
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    model_state = ckpt["state"]["model"]
    assert set(model_state) == set(trainer.state.model.state_dict())
    assert not any(k.startswith("module.") for k in model_state)
    for name, value in model_state.items():
        assert torch.equal(value, ema.ema_tensors[name]), name
    training = ckpt["state"]["algorithms"]["EMA"]["training_weights"]
    assert_bitwise_equal(training, weights(trainer.state.model))
    assert ckpt["model_weights"] == "published"
    assert {"optimizers", "schedulers", "algorithms", "timestamp", "rng"} <= set(ckpt["state"])
    assert ckpt["state"]["timestamp"]["batch"] == 4


def test_save_checkpoint_writes_training_weights(tmp_path: Path) -> None:
    trainer, ema = fit("1ep")
    path = trainer.save_checkpoint(tmp_path / "manual.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_weights"] == "training"
    assert_bitwise_equal(ckpt["state"]["model"], weights(trainer.state.model))
    assert_bitwise_equal(ckpt["state"]["algorithms"]["EMA"]["ema"], ema.ema_tensors)
    assert "training_weights" not in ckpt["state"]["algorithms"]["EMA"]


def test_model_holds_training_weights_after_fit_whatever_was_saved(tmp_path: Path) -> None:
    with_saves, _ = fit("2ep", save_folder=tmp_path, save_interval="1ba", eval_dataloader=make_loader(n=8),
                        eval_interval="1ba")  # fmt: skip
    without, _ = fit("2ep")
    assert_bitwise_equal(weights(with_saves.state.model), weights(without.state.model))


def test_epoch_unit_ema_with_checkpoint_at_epoch_boundary_cannot_corrupt_training(tmp_path: Path) -> None:
    """Composer's bug: a batch checkpoint at the epoch's last batch left EMA weights swapped in when the
    epoch-unit EMA blended at EPOCH_END. Here checkpoints never swap, so both runs agree bit for bit."""
    saved, saved_ema = fit("3ep", ema=EMA(half_life="1ep"), save_folder=tmp_path, save_interval="1ba")
    plain, plain_ema = fit("3ep", ema=EMA(half_life="1ep"))
    assert_bitwise_equal(weights(saved.state.model), weights(plain.state.model))
    assert_bitwise_equal(saved_ema.ema_tensors, plain_ema.ema_tensors)
    assert (saved_ema.n_averaged - 1) == 2


@pytest.mark.parametrize(
    ("ema_kwargs", "save_interval", "resume_file", "max_duration"),
    [
        ({"half_life": "3ba"}, "3ba", "ep0-ba3.pt", "3ep"),  # mid-epoch
        ({"half_life": "3ba"}, "1ep", "ep1-ba4.pt", "3ep"),  # epoch boundary
        ({"half_life": "1ep"}, "4ba", "ep0-ba4.pt", "3ep"),  # batch checkpoint before EPOCH_END
        ({"half_life": "2ba", "update_interval": "2ba", "ema_start": "0.5dur"}, "2ba", "ep0-ba2.pt", "10ba"),
        ({"half_life": "2ba", "ema_start": "0.5dur"}, "3ba", "ep1-ba6.pt", "10ba"),  # after the start
    ],
)
def test_resume_equals_uninterrupted_run(
    tmp_path: Path, ema_kwargs: dict[str, Any], save_interval: str, resume_file: str, max_duration: str
) -> None:
    full, full_ema = fit(max_duration, ema=EMA(**ema_kwargs), save_folder=tmp_path, save_interval=save_interval,
                         schedulers=None)  # fmt: skip
    resumed, resumed_ema = fit(max_duration, ema=EMA(**ema_kwargs), load_path=tmp_path / resume_file)
    assert resumed.state.timestamp.state_dict() == full.state.timestamp.state_dict()
    assert_bitwise_equal(weights(resumed.state.model), weights(full.state.model))
    assert resumed_ema.started == full_ema.started
    assert (resumed_ema.n_averaged - 1) == (full_ema.n_averaged - 1)
    assert_bitwise_equal(resumed_ema.ema_tensors, full_ema.ema_tensors)


def test_resume_with_optimizer_state_and_scheduler(tmp_path: Path) -> None:
    def run(**kwargs: Any) -> tuple[Trainer, EMA]:
        model = make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        ema = EMA(half_life="2ba")
        trainer = Trainer(model, make_loader(n=32), "3ep", algorithms=[ema], optimizers=opt, schedulers=sched,
                          progress_bar=False, **kwargs)  # fmt: skip
        trainer.fit()
        return trainer, ema

    full, full_ema = run(save_folder=tmp_path, save_interval="5ba")
    resumed, resumed_ema = run(load_path=tmp_path / "ep1-ba5.pt")
    assert_bitwise_equal(weights(resumed.state.model), weights(full.state.model))
    assert_bitwise_equal(resumed_ema.ema_tensors, full_ema.ema_tensors)
    assert resumed.state.schedulers[0].get_last_lr() == full.state.schedulers[0].get_last_lr()


def test_resume_with_shuffled_data(tmp_path: Path) -> None:
    def loader() -> DataLoader:
        return make_loader(n=32, shuffle=True)

    torch.manual_seed(1)
    full, full_ema = fit("3ep", loader=loader(), save_folder=tmp_path, save_interval="3ba", seed=7)
    resumed, resumed_ema = fit("3ep", loader=loader(), load_path=tmp_path / "ep1-ba6.pt", seed=123)
    assert_bitwise_equal(weights(resumed.state.model), weights(full.state.model))
    assert_bitwise_equal(resumed_ema.ema_tensors, full_ema.ema_tensors)


def test_checkpoint_rotation(tmp_path: Path) -> None:
    fit("2ep", save_folder=tmp_path, save_interval="1ba", save_num_checkpoints_to_keep=2)
    # ep1-ba8 (batch 8 before the last EPOCH_END) was replaced by the final ep2-ba8: two steps are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep1-ba7.pt", "ep2-ba8.pt", "latest.pt"]


def test_checkpoint_saver_arguments() -> None:
    with pytest.raises(ValueError, match=r"save_interval: got '3sp'; accepted units: 'ba', 'ep'"):
        CheckpointSaver("x", save_interval="3sp")
    with pytest.raises(ValueError, match=r"save_interval must be greater than 0, got '0ep'"):
        CheckpointSaver("x", save_interval="0ep")
    with pytest.raises(ValueError, match=r"num_checkpoints_to_keep must be -1 \(keep all\) or a positive int, got 0"):
        CheckpointSaver("x", num_checkpoints_to_keep=0)


def test_ddp_style_prefixes_are_not_saved(tmp_path: Path) -> None:
    """A model wrapped in DataParallel (prefix 'module.') saves and resumes under canonical names."""
    ema = EMA(half_life="2ba")
    trainer = Trainer(nn.DataParallel(make_model(0)), make_loader(n=16), "1ep", algorithms=[ema],
                      save_folder=tmp_path, progress_bar=False)  # fmt: skip
    trainer.fit()
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    plain = make_model(3)
    plain.load_state_dict(ckpt["state"]["model"])  # no name fiddling
    for name, value in plain.state_dict().items():
        assert torch.equal(value, ema.ema_tensors[name]), name
    resumed = Trainer(make_model(3), make_loader(n=16), "1ep", algorithms=[EMA(half_life="2ba")],
                      load_path=tmp_path / "latest.pt", progress_bar=False)  # fmt: skip
    assert_bitwise_equal(weights(resumed.state.model), {k: v for k, v in weights(trainer.state.model.module).items()})


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, r"model must be a torch.nn.Module, got str"),
        ({"train_dataloader": 5}, TypeError, r"train_dataloader must be iterable, got int"),
        ({"max_duration": "0.5dur"}, ValueError, r"max_duration: got '0.5dur'; accepted units: 'ep', 'ba', 'sp'"),
        ({"max_duration": "0ep"}, ValueError, r"max_duration must be greater than 0, got '0ep'"),
        ({"algorithms": ["ema"]}, TypeError, r"algorithms must hold Algorithm or Averager instances, got str"),
        ({"callbacks": [1]}, TypeError, r"callbacks must hold Callback instances, got int"),
        ({"optimizers": "sgd"}, TypeError, r"optimizers must hold Optimizer instances, got str"),
        ({"eval_interval": "1ep"}, ValueError, r"eval_interval='1ep' was given without an eval_dataloader"),
        ({"device": "tpu9"}, ValueError, r"device must be a torch device such as 'cpu' or 'cuda', got 'tpu9'"),
        ({"device": "meta"}, ValueError, r"device='meta' holds no data to train; use 'cpu' or 'cuda'"),
        ({"schedulers": 3}, TypeError, r"schedulers must have step\(\) and state_dict\(\), got int"),
        ({"seed": -1}, ValueError, r"seed must be a non-negative int or None, got -1"),
        ({"loss_fn": 3}, TypeError, r"loss_fn must be callable, got 3"),
    ],
)
def test_bad_trainer_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"model": make_model(0), "train_dataloader": make_loader(), "max_duration": "1ep"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Trainer(**args, progress_bar=False)


def test_empty_dataloader_is_an_error() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=4)
    trainer = Trainer(make_model(0), empty, "1ep", progress_bar=False)
    with pytest.raises(ValueError, match="train_dataloader yielded no batches"):
        trainer.fit()


def test_no_warnings_in_a_plain_run() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit("1ep", eval_dataloader=make_loader(n=8))


def test_default_optimizer_is_sgd_lr_0_1() -> None:
    trainer = Trainer(make_model(0), make_loader(), "1ep", progress_bar=False)
    (opt,) = trainer.state.optimizers
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1
    model = copy.deepcopy(trainer.state.model)
    assert model is not trainer.state.model
