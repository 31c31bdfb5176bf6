"""emakit's Lightning callback in real Lightning fits (CPU, tiny models, data made here).

Every expectation is computed independently: a closed-form EMA loop over the training weights recorded after
each optimizer step, a hand evaluation of ``ema.ema_model``, an uninterrupted fit for resumes, Lightning's own
``EMAWeightAveraging`` on the same run, and a single process for 2-rank DDP.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper module beside this file, package or not
from _lightning_worker import (
    LIGHTNING_NOTICES,
    EvalRecorder,
    Net,
    StepRecorder,
    ddp_fit,
    make_data,
    make_loader,
    make_net,
    make_trainer,
    posthoc_settings,
    weights,
)
from safetensors.torch import load_file

from emakit.engine.flatten import is_flattened
from emakit.integrations.lightning import TRAINING_STATE_KEY, EMACallback
from emakit.posthoc import read_snapshot_index

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_lightning_worker.py")
FP32_ATOL = 1e-6


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.filterwarnings(*LIGHTNING_NOTICES)


def reference_ema(after_step: list[dict[str, torch.Tensor]], smoothing: float, start: int = 1) -> dict[str, Any]:
    """The EMA written out: a copy of the weights at optimizer step ``start``, then one blend per later step.

    Floating tensors in float64 (the callback's fp32 must agree to fp32 rounding); integer tensors copied.
    """
    ema: dict[str, torch.Tensor] = {}
    for step, state in enumerate(after_step, start=1):
        if step < start:
            continue
        for name, value in state.items():
            if not value.is_floating_point():
                ema[name] = value.clone()
            elif step == start:
                ema[name] = value.double()
            else:
                ema[name] = smoothing * ema[name] + (1 - smoothing) * value.double()
    return ema


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if exact or not value.is_floating_point():
            assert got[name].dtype == value.dtype, name
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(
                got[name].double(), value.double(), rtol=0.0, atol=FP32_ATOL, msg=lambda m, n=name: f"{n}: {m}"
            )


def ema_weights(callback: EMACallback) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in callback.averager.ema_tensors.items()}


def hand_loss(module: nn.Module, loader: Any) -> float:
    """Mean cross-entropy over the loader's samples in eval mode, evaluated here (what ``val_loss`` should be)."""
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(nn.functional.cross_entropy(module(x), y, reduction="sum"))
            count += len(x)
    return total / count


# ------------------------------------------------------------------------------ the average itself
@pytest.mark.parametrize(("accumulate", "n"), [(1, 48), (2, 56)])
def test_ema_after_fit_equals_closed_form_over_recorded_steps(accumulate: int, n: int) -> None:
    """One update per optimizer step: 56 samples / 8 = 7 batches, accumulating 2 steps at batches 2, 4, 6, 7."""
    recorder = StepRecorder()
    callback = EMACallback(half_life="3ba")
    trainer = make_trainer([recorder, callback], max_epochs=2, accumulate_grad_batches=accumulate)
    model = make_net()
    trainer.fit(model, make_loader(n=n))

    steps_per_epoch = -(-(n // 8) // accumulate)
    assert trainer.global_step == 2 * steps_per_epoch == len(recorder.after_step)
    assert callback.averager.timestamp.batch == trainer.global_step
    assert (callback.averager.n_averaged - 1) == trainer.global_step - 1  # the first step starts the average as a copy
    expected = reference_ema(recorder.after_step, callback.averager.schedule.smoothing)
    assert_matches(ema_weights(callback), expected)
    # Integer buffers are copied from the model, not averaged: BatchNorm counted every micro-batch.
    assert callback.averager.ema_tensors["bn.num_batches_tracked"].item() == 2 * (n // 8)
    assert torch.equal(callback.averager.ema_tensors["bn.num_batches_tracked"], model.bn.num_batches_tracked)


class TwoOptimizers(Net):
    """Manual optimization stepping two optimizers per batch: ``global_step`` grows by 2, the EMA by 1."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()  # type: ignore[misc]
        x, y = batch
        for optimizer in (first, second):
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            optimizer.step()

    def configure_optimizers(self) -> Any:
        fc2 = list(self.fc2.parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in fc2)]
        return torch.optim.SGD(rest, lr=0.1), torch.optim.SGD(fc2, lr=0.1)


def test_manual_optimization_with_two_optimizers_is_one_update_per_batch() -> None:
    recorder = StepRecorder()
    callback = EMACallback(smoothing=0.7)
    trainer = make_trainer([recorder, callback], max_epochs=1)
    torch.manual_seed(0)
    trainer.fit(TwoOptimizers(), make_loader())
    assert trainer.global_step == 12 and len(recorder.after_step) == 6
    assert callback.averager.timestamp.batch == 6
    assert_matches(ema_weights(callback), reference_ema(recorder.after_step, 0.7))


@pytest.mark.parametrize(("ema_start", "start_batch"), [("0.5dur", 6), ("0.6dur", 8)])
def test_manual_optimization_dur_is_a_fraction_of_the_batches_that_step(ema_start: str, start_batch: int) -> None:
    """max_steps=24 counts optimizer steps, two per batch: 12 batches, which is what the EMA's clock counts."""
    recorder = StepRecorder()
    callback = EMACallback(smoothing=0.7, ema_start=ema_start)
    trainer = make_trainer([recorder, callback], max_epochs=5, max_steps=24)
    torch.manual_seed(0)
    trainer.fit(TwoOptimizers(), make_loader())
    assert trainer.global_step == 24 and len(recorder.after_step) == 12
    assert callback.averager.start_count == start_batch
    assert_matches(ema_weights(callback), reference_ema(recorder.after_step, 0.7, start=start_batch))


@pytest.mark.parametrize(
    ("trainer_kwargs", "ema_start", "start_step", "length"),
    [
        ({"max_epochs": 2}, "0.5dur", 6, "2ep"),
        ({"max_epochs": 2, "accumulate_grad_batches": 2}, "0.5dur", 3, "2ep"),
        ({"max_epochs": 5, "max_steps": 10}, "0.5dur", 5, "10ba"),
        ({"max_epochs": 2}, "1ep", 7, "2ep"),
        ({"max_epochs": 2}, "24sp", 3, "2ep"),
    ],
)
def test_ema_start_in_steps_epochs_samples_and_fractions_of_training(
    trainer_kwargs: dict[str, Any], ema_start: str, start_step: int, length: str
) -> None:
    """'dur' is a fraction of max_steps if set, else of max_epochs (6 batches, or 3 optimizer steps, an epoch)."""
    recorder = StepRecorder()
    callback = EMACallback(half_life="4ba", ema_start=ema_start)
    make_trainer([recorder, callback], **trainer_kwargs).fit(make_net(), make_loader())
    told = str(callback.averager.max_duration)  # the training length the callback told the EMA
    assert told == length
    assert callback.averager.start_count == start_step
    expected = reference_ema(recorder.after_step, callback.averager.schedule.smoothing, start=start_step)
    assert_matches(ema_weights(callback), expected)


def test_flatten_model_and_overlap_pass_through_and_change_nothing() -> None:
    plain = EMACallback(half_life="3ba")
    make_trainer([plain]).fit(make_net(), make_loader())
    fast = EMACallback(half_life="3ba", flatten_model=True, overlap=True)
    model = make_net()
    make_trainer([fast]).fit(model, make_loader())
    assert fast.averager.flatten_model and fast.averager.overlap and is_flattened(model)
    assert_matches(ema_weights(fast), ema_weights(plain), exact=True)


# ------------------------------------------------------------------------------ evaluation
def test_validation_runs_on_the_ema_and_puts_training_weights_back_bitwise() -> None:
    recorder, evals = StepRecorder(), EvalRecorder()
    callback = EMACallback(half_life="3ba", ema_start="4ba")
    val = make_loader(n=16, batch_size=16)
    trainer = make_trainer([recorder, callback, evals], max_epochs=2, val_check_interval=2)
    model = make_net()
    initial = weights(model)
    trainer.fit(model, make_loader(), val)

    assert evals.steps == [2, 4, 6, 8, 10, 12]
    for before, after in zip(evals.before, evals.after, strict=True):
        assert_matches(after, before, exact=True)
    # Before ema_start (step 2) validation sees the training weights, not an untrained copy.
    assert_matches(evals.during[0], evals.before[0], exact=True)
    assert not torch.equal(evals.during[0]["fc1.weight"], initial["fc1.weight"])
    # From then on, the average as of that step.
    for step, during in zip(evals.steps[1:], evals.during[1:], strict=True):
        expected = reference_ema(recorder.after_step[:step], callback.averager.schedule.smoothing, start=4)
        assert_matches(during, expected)
    assert not torch.equal(evals.during[-1]["fc1.weight"], evals.before[-1]["fc1.weight"])
    # The logged metric is the EMA model's loss, evaluated here by hand.
    assert evals.metrics[-1] == pytest.approx(hand_loss(callback.averager.ema_model, val), rel=1e-6)
    assert evals.metrics[-1] != pytest.approx(hand_loss(model, val), rel=1e-6)


def test_test_and_predict_run_on_the_ema_after_fit() -> None:
    callback = EMACallback(half_life="3ba")
    trainer = make_trainer([callback])
    model = make_net()
    trainer.fit(model, make_loader())
    trained = weights(model)
    data = make_loader(n=16, batch_size=16)

    (result,) = trainer.test(model, data, verbose=False)
    assert result["test_loss"] == pytest.approx(hand_loss(callback.averager.ema_model, data), rel=1e-6)
    (predictions,) = trainer.predict(model, data)  # type: ignore[misc]
    with torch.no_grad():
        torch.testing.assert_close(predictions, callback.averager.ema_model(next(iter(data))[0]), rtol=0, atol=0)
    assert_matches(weights(model), trained, exact=True)


@pytest.mark.parametrize("weights_after_fit", ["training", "ema"])
def test_weights_after_fit(weights_after_fit: str) -> None:
    recorder = StepRecorder()
    callback = EMACallback(half_life="3ba", weights_after_fit=weights_after_fit)  # type: ignore[arg-type]
    model = make_net()
    make_trainer([recorder, callback]).fit(model, make_loader())
    expected = recorder.after_step[-1] if weights_after_fit == "training" else ema_weights(callback)
    assert_matches(weights(model), expected, exact=True)


# ------------------------------------------------------------------------------ checkpoints
def epoch_checkpoints(folder: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)


def test_checkpoint_holds_ema_as_state_dict_and_training_weights_beside_it(tmp_path: Path) -> None:
    callback = EMACallback(half_life="3ba", ema_start="1ep")
    model = make_net()
    trainer = make_trainer([callback, epoch_checkpoints(tmp_path)], enable_checkpointing=True)
    trainer.fit(model, make_loader())

    # Epoch 0 ended before the average started: state_dict is the training weights, nothing beside it.
    first = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    assert TRAINING_STATE_KEY not in first and first["callbacks"]["EMACallback"]["ema"]["started"] is False
    last = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    assert_matches(dict(last["state_dict"]), ema_weights(callback), exact=True)
    assert_matches(dict(last[TRAINING_STATE_KEY]), weights(model), exact=True)
    assert last["callbacks"]["EMACallback"]["ema"]["num_updates"] == (callback.averager.n_averaged - 1)

    loaded = Net.load_from_checkpoint(tmp_path / "epoch=1.ckpt")
    assert_matches(weights(loaded), ema_weights(callback), exact=True)


class SaveDuringValidation(Callback):
    """After the EMACallback: writes a checkpoint while the EMA weights are swapped in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


def test_checkpoint_written_during_validation_keeps_training_weights_apart(tmp_path: Path) -> None:
    evals = EvalRecorder()
    callback = EMACallback(half_life="3ba")
    trainer = make_trainer([callback, evals, SaveDuringValidation(tmp_path / "mid.ckpt")], max_epochs=1)
    trainer.fit(make_net(), make_loader(), make_loader(n=16, batch_size=16))
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert_matches(dict(saved[TRAINING_STATE_KEY]), evals.before[-1], exact=True)
    assert_matches(dict(saved["state_dict"]), evals.during[-1], exact=True)
    assert not torch.equal(saved["state_dict"]["fc1.weight"], saved[TRAINING_STATE_KEY]["fc1.weight"])


@pytest.mark.parametrize("half_life", ["3ba", "1ep"])
def test_resume_from_epoch_checkpoint_equals_uninterrupted_fit_bitwise(tmp_path: Path, half_life: str) -> None:
    """Stopped after epoch 1 of 3 and resumed with ``ckpt_path``. Epoch ends are where Lightning itself resumes
    exactly with a fixed-order loader (mid-epoch it restarts the data); sanity validation runs on resume."""
    val = make_loader(n=16, batch_size=16)
    whole_cb = EMACallback(half_life=half_life)
    whole = make_net()
    options = {"max_epochs": 3, "enable_checkpointing": True, "num_sanity_val_steps": 1}
    make_trainer([whole_cb, epoch_checkpoints(tmp_path / "whole")], **options).fit(whole, make_loader(), val)

    resumed_cb = EMACallback(half_life=half_life)
    resumed = make_net(seed=123)  # different initial weights: everything must come from the checkpoint
    trainer = make_trainer([resumed_cb, epoch_checkpoints(tmp_path / "resumed")], **options)
    trainer.fit(resumed, make_loader(), val, ckpt_path=tmp_path / "whole" / "epoch=0.ckpt")

    assert_matches(weights(resumed), weights(whole), exact=True)
    assert_matches(ema_weights(resumed_cb), ema_weights(whole_cb), exact=True)
    assert (resumed_cb.averager.n_averaged - 1) == (whole_cb.averager.n_averaged - 1)
    assert resumed_cb.averager.timestamp == whole_cb.averager.timestamp
    final = {name: torch.load(tmp_path / name / "epoch=2.ckpt", weights_only=True) for name in ("whole", "resumed")}
    assert_matches(dict(final["resumed"]["state_dict"]), dict(final["whole"]["state_dict"]), exact=True)


class DropoutNet(Net):
    """Net with dropout: its masks come from the global RNG, which Lightning does not restore on resume."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.dropout(torch.relu(self.bn(self.fc1(x))), 0.3, self.training))


def test_resume_with_dropout_and_shuffling_follows_the_resumed_runs_own_weights(tmp_path: Path) -> None:
    """docs/guides/lightning.md's caveat: with dropout or a shuffled loader, Lightning does not restore the RNG,
    so a resumed run trains on other masks and batches than an uninterrupted one; the EMA still follows the
    training weights exactly: it equals a float64 EMA recomputed from the resumed run's own recorded weights."""
    smoothing = 0.8
    data = make_data()

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=8, shuffle=True)

    torch.manual_seed(0)
    whole_model = DropoutNet()
    whole_cb = EMACallback(smoothing=smoothing)
    options = {"max_epochs": 2, "enable_checkpointing": True}
    make_trainer([whole_cb, epoch_checkpoints(tmp_path)], **options).fit(whole_model, loader())

    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["callbacks"]["EMACallback"]["ema"]
    reference = {name: t.to(torch.float64) if t.is_floating_point() else t for name, t in saved["ema"].items()}
    torch.manual_seed(1)  # another process, another RNG state
    resumed_model, resumed_cb, steps = DropoutNet(), EMACallback(smoothing=smoothing), StepRecorder()
    make_trainer([resumed_cb, steps, epoch_checkpoints(tmp_path / "resumed")], **options).fit(
        resumed_model, loader(), ckpt_path=tmp_path / "epoch=0.ckpt"
    )
    assert len(steps.after_step) == 6 and (resumed_cb.averager.n_averaged - 1) == (whole_cb.averager.n_averaged - 1)
    for recorded in steps.after_step:
        for name, value in reference.items():
            w = recorded[name]
            reference[name] = smoothing * value + (1 - smoothing) * w.to(torch.float64) if w.is_floating_point() else w
    # the caveat is real: the resumed run's training weights are not the uninterrupted run's
    assert not torch.allclose(weights(resumed_model)["fc1.weight"], weights(whole_model)["fc1.weight"])
    got = ema_weights(resumed_cb)
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name].to(torch.float64), value, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[name], value), name


@pytest.mark.parametrize(("half_life", "ema_start"), [("1ep", "0.0dur"), ("2ba", "0.7dur")])
def test_resume_from_a_step_checkpoint_at_an_epoch_end_counts_that_epoch(
    tmp_path: Path, half_life: str, ema_start: str
) -> None:
    """every_n_train_steps=6 with 6 batches an epoch: step=12.ckpt is written after the epoch's last batch,
    before on_train_epoch_end, and Lightning resumes with the next epoch without that event."""
    options = {"max_epochs": 3, "enable_checkpointing": True}

    def saver(folder: Path) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=folder, filename="{step}", save_top_k=-1, every_n_train_steps=6)

    whole_cb = EMACallback(half_life=half_life, ema_start=ema_start)
    whole = make_net()
    make_trainer([whole_cb, saver(tmp_path / "whole")], **options).fit(whole, make_loader())
    saved = torch.load(tmp_path / "whole" / "step=12.ckpt", weights_only=True)
    assert (
        saved["callbacks"][next(k for k in saved["callbacks"] if "EMACallback" in k)]["ema"]["timestamp"][
            "batch_in_epoch"
        ]
        == 6
    )

    resumed_cb = EMACallback(half_life=half_life, ema_start=ema_start)
    resumed = make_net(seed=123)
    trainer = make_trainer([resumed_cb, saver(tmp_path / "resumed")], **options)
    trainer.fit(resumed, make_loader(), ckpt_path=tmp_path / "whole" / "step=12.ckpt")

    assert_matches(weights(resumed), weights(whole), exact=True)
    assert resumed_cb.averager.timestamp == whole_cb.averager.timestamp
    assert (resumed_cb.averager.n_averaged - 1) == (whole_cb.averager.n_averaged - 1)
    assert resumed_cb.averager.start_count == whole_cb.averager.start_count
    assert_matches(ema_weights(resumed_cb), ema_weights(whole_cb), exact=True)


def test_evaluating_a_checkpoint_uses_its_weights_not_the_live_average(tmp_path: Path) -> None:
    """``trainer.test(ckpt_path=...)`` after fit tests the checkpoint's EMA, not the callback's final one."""
    callback = EMACallback(half_life="3ba")
    model = make_net()
    trainer = make_trainer([callback, epoch_checkpoints(tmp_path)], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, make_loader())
    data = make_loader(n=16, batch_size=16)
    (result,) = trainer.test(model, data, ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    assert result["test_loss"] == pytest.approx(hand_loss(Net.load_from_checkpoint(tmp_path / "epoch=0.ckpt"), data))
    assert result["test_loss"] != pytest.approx(hand_loss(callback.averager.ema_model, data))


# ------------------------------------------------------------------------------ against Lightning's own EMA
def test_same_floats_as_lightning_ema_weight_averaging_but_integer_buffers_copied() -> None:
    smoothing = 0.8
    ours = EMACallback(smoothing=smoothing)
    ours_model = make_net()
    make_trainer([ours]).fit(ours_model, make_loader())
    theirs = EMAWeightAveraging(decay=smoothing)
    make_trainer([theirs]).fit(make_net(), make_loader())
    assert theirs._average_model is not None
    their_state = theirs._average_model.module.state_dict()

    for name, value in ours.averager.ema_tensors.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, their_state[name], rtol=0, atol=1e-6)
    # num_batches_tracked after 12 steps: ours is the model's count; theirs is an average truncated each step.
    truncated = torch.tensor(1)
    for count in range(2, 13):
        truncated = (smoothing * truncated + (1 - smoothing) * torch.tensor(count)).to(torch.int64)
    assert ours.averager.ema_tensors["bn.num_batches_tracked"].item() == ours_model.bn.num_batches_tracked.item() == 12
    assert their_state["bn.num_batches_tracked"].item() == truncated.item() < 12


# ------------------------------------------------------------------------------ 2 ranks
@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single, single_model = ddp_fit(devices=1)
    for name in ("plain", "flat_overlap"):
        assert_matches(ranks[1][name]["ema"], ranks[0][name]["ema"], exact=True)
        assert ranks[0][name]["batch"] == single.averager.timestamp.batch == 12
        assert ranks[0][name]["num_updates"] == (single.averager.n_averaged - 1)
        # Gradients summed across ranks in another order than one batch of 8: equal to fp32 rounding.
        for got, expected in (
            (ranks[0][name]["ema"], ema_weights(single)),
            (ranks[0][name]["weights"], weights(single_model)),
        ):
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    assert_matches(ranks[0]["flat_overlap"]["ema"], ranks[0]["plain"]["ema"], exact=True)
    # post-hoc EMA: one snapshot series, written by rank 0 alone, equal to one process's to fp32 rounding
    ddp_fit(devices=1, **posthoc_settings(tmp_path / "single"))
    written = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert [i.step for i in read_snapshot_index(tmp_path / "snapshots")] == [2, 4, 6, 8, 10, 12]
    for got, expected in zip(
        read_snapshot_index(tmp_path / "snapshots"), read_snapshot_index(tmp_path / "single"), strict=True
    ):
        assert got.t == expected.t
        a, b = load_file(got.path), load_file(expected.path)
        assert set(a) == set(b)
        for key, value in b.items():
            torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"half_life": "-5ba"}, "half_life.*-5ba"),
        ({"half_life": "0.5dur"}, "half_life.*0.5dur"),
        ({"half_life": 0}, "half_life.*0"),
        ({"half_life": "10ba", "smoothing": 0.9}, "half_life='10ba'.*smoothing=0.9"),
        ({"smoothing": 1.5}, "smoothing.*1.5"),
        ({"ema_start": "2dur"}, "ema_start.*2.0dur"),
        ({"ema_start": "soon"}, "ema_start.*soon"),
        ({"update_interval": "0ba"}, "update_interval.*0ba"),
        ({"half_life": "10ba", "update_interval": "1ep"}, "update_interval='1ep'.*half_life='10ba'"),
        ({"fp32_ema": "yes"}, "fp32_ema.*'yes'"),
        ({"skip_nonfinite": 1}, "skip_nonfinite.*1"),
        ({"flatten_model": None}, "flatten_model.*None"),
        ({"overlap": "no"}, "overlap.*'no'"),
        ({"weights_after_fit": "final"}, "weights_after_fit.*'final'"),
        ({"sigma_rel": 2.0}, "sigma_rel.*2.0"),  # EMA's further keywords pass through, checks and all
    ],
)
def test_bad_hyperparameters_name_the_argument_and_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        EMACallback(**kwargs)


def test_ema_start_after_max_steps_is_refused_before_training() -> None:
    callback = EMACallback(ema_start="20ba")
    model = make_net()
    initial = weights(model)
    with pytest.raises(ValueError, match=re.escape("ema_start='20ba' is after max_duration='10ba'")):
        make_trainer([callback], max_steps=10).fit(model, make_loader())
    assert_matches(weights(model), initial, exact=True)


class CPUFSDP(FSDPStrategy):
    """Lightning refuses FSDPStrategy itself on CPU; a subclass gets past that check, and to ours."""


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (lambda: CPUFSDP(), "strategy CPUFSDP .*FSDP1.*use ModelParallelStrategy with .*fully_shard"),
        (
            lambda: ModelParallelStrategy(save_distributed_checkpoint=False),
            "ModelParallelStrategy\\(save_distributed_checkpoint=False\\).*Keep save_distributed_checkpoint=True",
        ),
        (lambda: "ddp_spawn", "DDPStrategy started by spawning or forking"),
        (lambda: DDPStrategy(start_method="fork"), "DDPStrategy started by spawning or forking"),
    ],
)
def test_unsupported_strategies_are_refused_at_setup(strategy: Any, message: str) -> None:
    """``setup`` is the first hook Lightning calls in every process, before the model is touched."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy(), logger=False)
    with pytest.raises(ValueError, match=message):
        EMACallback().setup(trainer, make_net(), "fit")


def test_ddp_spawn_is_refused_in_the_main_process_before_any_child_starts() -> None:
    """Lightning calls no hook before its launcher starts processes; a spawn launcher pickles the callback there,
    in this process, and that is refused with the plain error (not a child's traceback, ProcessRaisedException)."""
    import torch.multiprocessing as tmp

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, callbacks=[EMACallback()], logger=False
    )
    started = []
    original = tmp.start_processes

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.append(True)
        return original(*args, **kwargs)

    tmp.start_processes = spy  # type: ignore[assignment]
    try:
        with pytest.raises(
            ValueError, match=r"^emakit's averaging callbacks do not support DDPStrategy started by spawning"
        ):
            trainer.fit(make_net(), make_loader())
    finally:
        tmp.start_processes = original
    assert started  # the launcher was on its way: refused while pickling the first child's arguments


def test_model_parallel_strategy_is_accepted() -> None:
    """FSDP2 and tensor parallelism: the EMA keeps each rank's shards (2-rank runs: test_lightning_fsdp.py)."""
    from emakit.integrations.lightning_strategies import strategy_refusal

    assert strategy_refusal(ModelParallelStrategy()) is None
    assert strategy_refusal(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)) is None


def test_fsdp1_refused_by_lightning_itself_on_cpu() -> None:
    """Lightning's FSDPStrategy does not run on CPU at all, with or without emakit."""
    with pytest.raises(ValueError, match=r"`fsdp` requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=1, strategy="fsdp", logger=False)


def test_refused_strategy_raises_before_training_starts() -> None:
    model = make_net()
    initial = weights(model)
    trainer = make_trainer([EMACallback()], strategy=CPUFSDP(), devices=1)
    with pytest.raises(ValueError, match="strategy CPUFSDP"):
        trainer.fit(model, make_loader())
    assert trainer.global_step == 0
    assert_matches(weights(model), initial, exact=True)


def test_deepspeed_is_refused() -> None:
    from emakit.integrations.lightning_strategies import strategy_refusal

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # refused before DeepSpeed is set up
    refusal = str(strategy_refusal(strategy))
    assert "strategy DeepSpeedStrategy" in refusal
    assert "runs on CUDA GPUs only" in refusal
    assert "DeepSpeed's own loop" in refusal and "TrainingArguments.deepspeed" in refusal


def test_lightning_refuses_its_deepspeed_strategy_on_cpu() -> None:
    # why emakit cannot follow DeepSpeedStrategy here: Lightning itself does not run it without CUDA
    pytest.importorskip("deepspeed")
    strategy = DeepSpeedStrategy(stage=3, accelerator=pl.accelerators.CPUAccelerator())
    with pytest.raises(RuntimeError, match="The DeepSpeed strategy is only supported on CUDA GPUs"):
        strategy.setup_environment()


def test_one_ema_callback_per_trainer_and_not_with_lightnings_own() -> None:
    """Each rewrites the checkpoint's state_dict. Lightning refuses two callbacks with one state key itself."""
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `EMACallback`"):
        make_trainer([EMACallback(), EMACallback()])
    model = make_net()
    initial = weights(model)
    with pytest.raises(ValueError, match="EMAWeightAveraging"):
        make_trainer([EMACallback(), EMAWeightAveraging()]).fit(model, make_loader())
    assert_matches(weights(model), initial, exact=True)


# ------------------------------------------------------------------------------ packaging and docs
def test_import_emakit_does_not_import_lightning() -> None:
    code = "import sys, emakit, emakit.integrations; from emakit import EMA; assert 'lightning' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def readme_lightning_block() -> str:
    text = (ROOT / "docs/guides/lightning.md").read_text(encoding="utf-8")
    section = text.split("\n## ", 1)[0]  # the page's opening section, before "## How it works"
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/guides/lightning.md opens with one python block"
    return blocks[0]


def test_readme_lightning_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(readme_lightning_block(), "docs/guides/lightning.md", "exec"), namespace)
    callback = namespace["callback"]
    assert isinstance(callback, EMACallback) and callback.averager.started
    assert isinstance(namespace["averaged"], nn.Module)


def test_weights_only_checkpoints_warn_and_hold_the_training_weights(tmp_path: Path) -> None:
    """Lightning writes weights-only files without calling callbacks: documented, and warned at setup."""
    callback = EMACallback(half_life="3ba")
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", save_weights_only=True)
    model = make_net()
    with pytest.warns(UserWarning, match=re.escape("ModelCheckpoint(save_weights_only=True)")):
        make_trainer([callback, saver], max_epochs=1, enable_checkpointing=True).fit(model, make_loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert TRAINING_STATE_KEY not in saved
    assert_matches(dict(saved["state_dict"]), weights(model), exact=True)


def test_resuming_a_checkpoint_without_ema_state_warns_and_starts_afresh(tmp_path: Path) -> None:
    make_trainer([epoch_checkpoints(tmp_path)], max_epochs=1, enable_checkpointing=True).fit(make_net(), make_loader())
    recorder, callback = StepRecorder(), EMACallback(half_life="3ba")
    with pytest.warns(UserWarning, match="holds no EMACallback state"):
        make_trainer([recorder, callback], max_epochs=2).fit(
            make_net(seed=5), make_loader(), ckpt_path=tmp_path / "epoch=0.ckpt"
        )
    assert callback.averager.timestamp.batch == 6 and callback.averager.start_count == 1
    assert_matches(ema_weights(callback), reference_ema(recorder.after_step, callback.averager.schedule.smoothing))
