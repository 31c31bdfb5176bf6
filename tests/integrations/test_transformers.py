"""emakit.integrations.transformers against the real ``transformers.Trainer`` (CPU, tiny GPT-2 from a config).

Expectations are independent of the callback: the EMA recomputed from its definition over the training
weights recorded after every optimizer step, the Trainer's own evaluation of a model holding those weights,
an uninterrupted run for resuming, ``from_pretrained`` for saving, and a single-process run for DDP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from _hf_common import (
    Recorder,
    StopAt,
    TokenData,
    ema_reference,
    tiny_model,
    training_args,
    weights,
)
from _hf_readme import readme_blocks
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback

from emakit.integrations.transformers import (
    EMA_STATE_NAME,
    EMA_WEIGHTS_NAME,
    EMACallback,
    EMATrainer,
    EMATrainerMixin,
)

FP32 = {"rtol": 1e-5, "atol": 1e-6}
TRAIN, EVAL = TokenData(40, seed=0), TokenData(16, seed=1)  # 40 samples of 4: 10 micro-batches an epoch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """A tiny model trains ~10x faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ema_params(callback: EMACallback) -> dict[str, torch.Tensor]:
    """The EMA of the trainable parameters (the average also holds buffers), detached copies."""
    names = set(weights(callback.averager.model))
    return {n: t.detach().clone() for n, t in callback.averager.ema_tensors.items() if n in names}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if exact:
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value, **FP32, msg=lambda m, name=name: f"{name}: {m}")


def train(
    out: Path,
    callback: EMACallback | None,
    *extra: TrainerCallback,
    trainer_class: type[Trainer] = EMATrainer,
    resume: str | bool | None = None,
    dropout: float = 0.0,
    **overrides: Any,
) -> Trainer:
    callbacks = [c for c in (callback, *extra) if c is not None]
    trainer = trainer_class(
        model=tiny_model(dropout=dropout),
        args=training_args(out, **overrides),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def evaluate_weights(out: Path, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The plain Trainer's evaluation of a tiny model holding ``state`` (the independent reference)."""
    model = tiny_model()
    model.load_state_dict(state, strict=False)
    return Trainer(model=model, args=training_args(out), eval_dataset=EVAL).evaluate()


# ------------------------------------------------------------------------------------- the average
@pytest.mark.parametrize(
    ("hyperparameters", "accumulation", "smoothing", "start", "interval"),
    [
        ({"smoothing": 0.6}, 1, 0.6, 1, 1),
        ({"smoothing": 0.6}, 2, 0.6, 1, 1),
        ({"half_life": "3ba", "update_interval": "2ba", "ema_start": "0.5dur"}, 2, 2 ** (-2 / 3), 4, 2),
    ],
    ids=["every-step", "accumulate-2", "half-life-start-interval"],
)
def test_ema_after_train_is_the_average_of_the_weights_after_each_optimizer_step(
    tmp_path: Path, hyperparameters: dict[str, Any], accumulation: int, smoothing: float, start: int, interval: int
) -> None:
    callback, recorder = EMACallback(**hyperparameters), Recorder()
    trainer = train(tmp_path, callback, recorder, gradient_accumulation_steps=accumulation, max_steps=8)

    assert len(recorder.after_step) == 8 == trainer.state.global_step  # one record per optimizer step
    assert callback.averager.timestamp.batch == 8
    assert callback.averager.start_count == start
    assert (callback.averager.n_averaged - 1) == len([k for k in range(start + 1, 9) if k % interval == 0])
    expected = ema_reference(recorder.after_step, smoothing, start, interval)
    assert_same(ema_params(callback), expected, exact=False)


def test_epoch_units_blend_at_complete_epochs_only(tmp_path: Path) -> None:
    # 10 micro-batches of 4 an epoch, accumulation 2: 5 optimizer steps an epoch; max_steps 13 cuts epoch 3.
    callback, recorder = EMACallback(half_life="1ep"), Recorder()
    train(tmp_path, callback, recorder, gradient_accumulation_steps=2, max_steps=13)

    assert recorder.epochs == [1.0, 2.0, 2.6]
    assert callback.averager.timestamp.epoch == 2  # the cut epoch is not an epoch end
    expected = ema_reference(recorder.at_epoch_end[:2], 0.5)
    assert_same(ema_params(callback), expected, exact=False)


# ------------------------------------------------------------------------------------- evaluation
class EvalRecorder(TrainerCallback):  # type: ignore[misc]
    """At each evaluation: the metrics, the weights in the model then, and the EMA's average then."""

    def __init__(self, callback: EMACallback) -> None:
        self.callback = callback
        self.records: list[tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]] = []

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, model: Any = None, **kw: Any
    ) -> None:
        started = self.callback.averager.started
        self.records.append((dict(metrics), weights(model), ema_params(self.callback) if started else None))


def test_evaluate_runs_on_the_ema_weights_and_restores_the_training_weights_bitwise(tmp_path: Path) -> None:
    # ema_start at step 4: the evaluation at step 2 sees the training weights, those at 4 and 6 the EMA's.
    callback = EMACallback(smoothing=0.7, ema_start="4ba")
    evals, recorder = EvalRecorder(callback), Recorder()
    trainer = train(tmp_path / "run", callback, evals, recorder, eval_strategy="steps", eval_steps=2)
    plain_recorder = Recorder()  # the same training without any evaluation
    train(tmp_path / "plain", None, plain_recorder, trainer_class=Trainer)

    # evaluating did not change training: the weights after every step are the same to the bit
    for got, expected in zip(recorder.after_step, plain_recorder.after_step, strict=True):
        assert_same(got, expected)

    (m2, in_model2, ema2), (m4, in_model4, ema4), (m6, in_model6, ema6) = evals.records
    assert ema2 is None and ema4 is not None and ema6 is not None
    assert_same(in_model2, recorder.after_step[1])  # not started: the training weights
    assert_same(in_model4, ema4)  # started: the EMA's
    assert_same(in_model6, ema6)
    for metrics, state in ((m2, recorder.after_step[1]), (m4, ema4), (m6, ema6)):
        assert metrics["eval_loss"] == pytest.approx(evaluate_weights(tmp_path / "ref", state)["eval_loss"], rel=1e-6)

    # a direct call after training: EMA metrics, training weights unchanged to the bit
    before = weights(trainer.model)
    metrics = trainer.evaluate()
    assert_same(weights(trainer.model), before)
    assert metrics["eval_loss"] == pytest.approx(evaluate_weights(tmp_path / "ref", ema6)["eval_loss"], rel=1e-6)
    assert metrics["eval_loss"] != pytest.approx(evaluate_weights(tmp_path / "ref", before)["eval_loss"], rel=1e-6)

    # predict() is on the EMA weights too; eval_with_ema=False gives the training weights
    predicted = trainer.predict(EVAL).metrics["test_loss"]
    assert predicted == pytest.approx(metrics["eval_loss"], rel=1e-6)
    callback.eval_with_ema = False
    raw = trainer.evaluate()["eval_loss"]
    assert raw == pytest.approx(evaluate_weights(tmp_path / "ref", before)["eval_loss"], rel=1e-6)


def test_evaluate_puts_the_training_weights_back_when_it_fails(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.5)
    trainer = train(tmp_path, callback)
    before = weights(trainer.model)

    def broken_metrics(prediction: Any) -> dict[str, float]:
        raise RuntimeError("metric failed")

    trainer.compute_metrics = broken_metrics
    with pytest.raises(RuntimeError, match="metric failed"):
        trainer.evaluate()
    assert_same(weights(trainer.model), before)
    assert not callback.averager.ema_weights_active


def test_evaluate_with_several_datasets_uses_the_ema_for_each(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.5)
    trainer = train(tmp_path, callback)
    ema = ema_params(callback)
    metrics = trainer.evaluate({"a": EVAL, "b": TokenData(8, seed=5)})
    assert metrics["eval_a_loss"] == pytest.approx(evaluate_weights(tmp_path / "ref", ema)["eval_loss"], rel=1e-6)
    reference_b = Trainer(model=_with(ema), args=training_args(tmp_path / "ref"), eval_dataset=TokenData(8, seed=5))
    assert metrics["eval_b_loss"] == pytest.approx(reference_b.evaluate()["eval_loss"], rel=1e-6)


def _with(state: dict[str, torch.Tensor]) -> GPT2LMHeadModel:
    model = tiny_model()
    model.load_state_dict(state, strict=False)
    return model


# ------------------------------------------------------------------------------------- checkpoints
class SaveRecorder(TrainerCallback):  # type: ignore[misc]
    """The training weights and the EMA at each checkpoint save (put after the EMACallback)."""

    def __init__(self, callback: EMACallback) -> None:
        self.callback = callback
        self.saved: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.saved[state.global_step] = (weights(model), ema_params(self.callback))


def test_every_checkpoint_holds_the_ema_model_and_state(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.6)
    saves = SaveRecorder(callback)
    train(tmp_path, callback, saves, save_strategy="steps", save_steps=3)

    assert sorted(saves.saved) == [3, 6]
    for step, (training, ema) in saves.saved.items():
        folder = tmp_path / f"checkpoint-{step}"
        # the Trainer's model file keeps the training weights (resuming needs them)
        assert_same(weights(GPT2LMHeadModel.from_pretrained(folder)), training)
        # the EMA's state: the average at that step and its clock
        state = torch.load(folder / EMA_STATE_NAME, weights_only=True)
        assert state["timestamp"]["batch"] == step and state["num_updates"] == step - 1
        assert_same({n: t for n, t in state["ema"].items() if n in ema}, ema)
        # the EMA model: the whole state_dict, the average in place of every averaged tensor
        exported = load_file(folder / EMA_WEIGHTS_NAME)
        assert set(exported) == set(tiny_model().state_dict())
        assert_same({n: t for n, t in exported.items() if n in ema}, ema)


def test_checkpoint_ema_weights_load_into_a_tied_model(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.6)
    saves = SaveRecorder(callback)
    train(tmp_path, callback, saves, save_strategy="steps", save_steps=3, max_steps=3)
    model = tiny_model(seed=123)
    model.load_state_dict(load_file(tmp_path / "checkpoint-3" / EMA_WEIGHTS_NAME))
    assert_same(weights(model), saves.saved[3][1])  # the output layer is tied to the token embedding


@pytest.mark.parametrize("resume", ["path", True])
def test_resume_from_checkpoint_continues_exactly(tmp_path: Path, resume: str | bool) -> None:
    """8 steps in one go vs. 5 (cut mid-epoch, after checkpoint-5) and then 3 more in a new Trainer.

    Dropout is on: the Trainer restores its RNG state, the data order (seeded sampler, skipped batches) and
    the optimizer and scheduler, so the training weights match to the bit, and so must the EMA."""
    run = {"gradient_accumulation_steps": 2, "max_steps": 8, "save_strategy": "steps", "save_steps": 5}
    full = EMACallback(half_life="2ba", ema_start="0.25dur")
    reference = train(tmp_path / "full", full, dropout=0.1, **run)

    train(tmp_path / "cut", EMACallback(half_life="2ba", ema_start="0.25dur"), StopAt(5), dropout=0.1, **run)
    assert (tmp_path / "cut" / "checkpoint-5" / EMA_STATE_NAME).is_file()
    resumed_callback = EMACallback(half_life="2ba", ema_start="0.25dur")
    target = str(tmp_path / "cut" / "checkpoint-5") if resume == "path" else True
    resumed = train(tmp_path / "cut", resumed_callback, resume=target, dropout=0.1, **run)

    assert_same(weights(resumed.model), weights(reference.model))
    assert_same(ema_params(resumed_callback), ema_params(full))
    assert (
        (resumed_callback.averager.n_averaged - 1) == (full.averager.n_averaged - 1) == 6
    )  # started at step 2, then 3..8
    assert resumed_callback.averager.timestamp.batch == 8


@pytest.mark.parametrize(("half_life", "ema_start"), [("1ep", "0.0dur"), ("2ba", "2ep")])
def test_resume_from_a_checkpoint_at_an_epoch_end_counts_that_epoch(
    tmp_path: Path, half_life: str, ema_start: str
) -> None:
    """5 optimizer steps an epoch and save_steps=5: checkpoint-10 is written at the second epoch's last step,
    before on_epoch_end, and the resumed Trainer starts the third epoch without that event."""
    run = {"gradient_accumulation_steps": 2, "max_steps": 13, "save_strategy": "steps", "save_steps": 5}
    full = EMACallback(half_life=half_life, ema_start=ema_start)
    reference = train(tmp_path / "full", full, **run)
    saved = torch.load(tmp_path / "full" / "checkpoint-10" / EMA_STATE_NAME, weights_only=True)
    assert saved["timestamp"]["batch_in_epoch"] == 5

    resumed_callback = EMACallback(half_life=half_life, ema_start=ema_start)
    resumed = train(tmp_path / "full", resumed_callback, resume=str(tmp_path / "full" / "checkpoint-10"), **run)

    assert_same(weights(resumed.model), weights(reference.model))
    assert resumed_callback.averager.timestamp == full.averager.timestamp
    assert resumed_callback.averager.start_count == full.averager.start_count
    assert (resumed_callback.averager.n_averaged - 1) == (full.averager.n_averaged - 1)
    assert_same(ema_params(resumed_callback), ema_params(full))


def test_resume_from_a_checkpoint_without_ema_warns_and_starts_a_fresh_average(tmp_path: Path) -> None:
    run = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    train(tmp_path, EMACallback(smoothing=0.5), StopAt(3), **run)
    (tmp_path / "checkpoint-3" / EMA_STATE_NAME).unlink()
    callback, recorder = EMACallback(smoothing=0.5), Recorder()
    with pytest.warns(
        UserWarning, match=r"checkpoint-3, which holds no emakit_ema\.pt: the EMA starts a fresh average"
    ):
        train(tmp_path, callback, recorder, resume=True, **run)
    assert callback.averager.start_count == 1 and (callback.averager.n_averaged - 1) == 2  # steps 4, 5, 6 of this run
    assert_same(ema_params(callback), ema_reference(recorder.after_step, 0.5), exact=False)


def test_resume_refuses_ema_state_from_another_step(tmp_path: Path) -> None:
    run = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}
    train(tmp_path, EMACallback(smoothing=0.5), StopAt(4), **run)
    shutil.copy(tmp_path / "checkpoint-2" / EMA_STATE_NAME, tmp_path / "checkpoint-4" / EMA_STATE_NAME)
    with pytest.raises(ValueError, match=r"saved at optimizer step 2, but the Trainer resumes at step 4"):
        train(tmp_path, EMACallback(smoothing=0.5), resume=True, **run)


def test_resume_from_a_truncated_ema_state_names_the_file(tmp_path: Path) -> None:
    run = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    train(tmp_path, EMACallback(smoothing=0.5), StopAt(3), **run)
    state = tmp_path / "checkpoint-3" / EMA_STATE_NAME
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint '.*checkpoint-3/{EMA_STATE_NAME}' is truncated or damaged"):
        train(tmp_path, EMACallback(smoothing=0.5), resume=True, **run)


def test_load_best_model_at_end_keeps_the_best_checkpoints_ema(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.5)
    trainer = train(
        tmp_path,
        callback,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the worst loss "wins", so that the best checkpoint is not the last one
    )
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-6"
    saved = torch.load(best / EMA_STATE_NAME, weights_only=True)
    assert callback.averager.timestamp.batch == saved["timestamp"]["batch"]
    assert_same({n: t for n, t in callback.averager.ema_tensors.items() if n in saved["ema"]}, saved["ema"])


# ------------------------------------------------------------------------------------- save_model
def test_save_model_writes_the_ema_as_the_model_for_from_pretrained(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.6, save_ema_as_model=True)
    saves = SaveRecorder(callback)
    trainer = train(tmp_path / "run", callback, saves, save_strategy="steps", save_steps=3)
    training, ema = weights(trainer.model), ema_params(callback)

    trainer.save_model(str(tmp_path / "final"))
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    assert_same(weights(loaded), ema)
    assert_same(weights(trainer.model), training)  # swapped back
    # the checkpoint written during train() kept the training weights
    assert_same(weights(GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "checkpoint-3")), saves.saved[3][0])


def test_save_model_writes_the_training_weights_by_default(tmp_path: Path) -> None:
    callback = EMACallback(smoothing=0.6)
    trainer = train(tmp_path / "run", callback)
    trainer.save_model(str(tmp_path / "final"))
    assert_same(weights(GPT2LMHeadModel.from_pretrained(tmp_path / "final")), weights(trainer.model))


# ------------------------------------------------------------------------------------- without the mixin
def test_plain_trainer_warns_that_evaluation_uses_the_training_weights(tmp_path: Path) -> None:
    callback, recorder = EMACallback(smoothing=0.6), Recorder()
    with pytest.warns(UserWarning, match="evaluate\\(\\) and predict\\(\\) use the training weights"):
        trainer = train(tmp_path, callback, recorder, trainer_class=Trainer)
    assert_same(ema_params(callback), ema_reference(recorder.after_step, 0.6), exact=False)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(
        evaluate_weights(tmp_path / "ref", weights(trainer.model))["eval_loss"], rel=1e-6
    )


def test_plain_trainer_refuses_save_ema_as_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_ema_as_model=True\\) needs a Trainer with EMATrainerMixin"):
        train(tmp_path, EMACallback(save_ema_as_model=True), trainer_class=Trainer)


def test_mixin_composes_with_another_trainer_subclass(tmp_path: Path) -> None:
    class LoggingTrainer(Trainer):  # type: ignore[misc]
        evaluations = 0

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            LoggingTrainer.evaluations += 1
            return super().evaluate(*args, **kwargs)

    class MyTrainer(EMATrainerMixin, LoggingTrainer):
        pass

    callback = EMACallback(smoothing=0.6)
    trainer = train(tmp_path, callback, trainer_class=MyTrainer)
    metrics = trainer.evaluate()
    assert LoggingTrainer.evaluations == 1
    assert metrics["eval_loss"] == pytest.approx(
        evaluate_weights(tmp_path / "ref", ema_params(callback))["eval_loss"], rel=1e-6
    )


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"half_life": "ten"}, ValueError, r"half_life: 'ten' is not a time"),
        ({"smoothing": 1.5}, ValueError, r"smoothing must be a real number in \[0, 1\], got 1\.5"),
        (
            {"half_life": "3ba", "smoothing": 0.9},
            ValueError,
            "exactly one of half_life, smoothing, sigma_rel and half_life_fraction",
        ),
        ({"ema_start": "100sp"}, ValueError, "ema_start='100sp'.*'ba'"),
        ({"save_ema_as_model": "yes"}, TypeError, "save_ema_as_model must be a bool, got 'yes'"),
        ({"eval_with_ema": 1}, TypeError, "eval_with_ema must be a bool, got 1"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EMACallback(**kwargs)


def test_ema_start_after_max_steps_is_refused_before_training(tmp_path: Path) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="ema_start='20ba' is after max_duration='6ba'"):
        train(tmp_path, EMACallback(ema_start="20ba"), recorder)
    assert recorder.after_step == []


def test_two_ema_callbacks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most one averaging callback, this one has 2"):
        train(tmp_path, EMACallback(), EMACallback())


def test_fsdp_arguments_are_refused_when_the_trainer_is_built(tmp_path: Path) -> None:
    # Transformers builds FSDP Trainers only under torch.distributed (the 2-rank test builds a real one);
    # here the arguments get fsdp after construction and the callbacks' init event is replayed.
    trainer = EMATrainer(model=tiny_model(), args=training_args(tmp_path), callbacks=[EMACallback()])
    trainer.args.fsdp = True
    with pytest.raises(ValueError, match=r"do not support the Trainer's FSDP \(TrainingArguments.fsdp=True\)"):
        trainer.callback_handler.on_init_end(trainer.args, trainer.state, trainer.control)


def test_fsdp1_wrapped_models_are_refused_when_training_starts(tmp_path: Path) -> None:
    trainer = EMATrainer(
        model=tiny_model(), args=training_args(tmp_path), train_dataset=TRAIN, callbacks=[EMACallback()]
    )
    # FullyShardedDataParallel needs a process group to be built; its class is what the check looks for
    wrapper = type(
        "Wrapped", (torch.distributed.fsdp.FullyShardedDataParallel,), {"__init__": torch.nn.Module.__init__}
    )()
    trainer.model.transformer.add_module("wrapped", wrapper)
    with pytest.raises(
        ValueError, match=r"do not support FSDP1: the Trainer's model is wrapped in FullyShardedDataParallel"
    ):
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)


def test_import_emakit_does_not_import_transformers() -> None:
    code = "import sys, emakit; from emakit import EMA; assert 'transformers' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------- README
def test_readme_transformers_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_blocks("Hugging Face Transformers", "transformers.md")  # docs/guides/transformers.md
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/guides/transformers.md", "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------------------------- DDP
WORKER = Path(__file__).with_name("_hf_ddp_worker.py")


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): train with evaluation and checkpoints, cut and resume, refuse FSDP."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:  # a real FSDP Trainer is refused when it is built
        assert rank["fsdp_error"].startswith(
            "emakit's averaging callbacks do not support the Trainer's FSDP (TrainingArguments.fsdp=True)"
        )

    # the ranks agree to the bit, and resuming under DDP is exact
    for key in ("weights", "ema", "resumed_weights", "resumed_ema"):
        assert_same(ranks[1][key], ranks[0][key])
    assert_same(ranks[0]["resumed_weights"], ranks[0]["weights"])
    assert_same(ranks[0]["resumed_ema"], ranks[0]["ema"])
    # one snapshot series per run, written by rank 0; the cut-and-resumed one equals the uninterrupted one
    from emakit.posthoc import read_snapshot_index

    series = [read_snapshot_index(tmp_path / run / "snapshots") for run in ("full", "cut")]
    assert [info.step for info in series[0]] == [info.step for info in series[1]] == [2, 3, 4, 5, 6]
    for full_info, cut_info in zip(*series, strict=True):
        assert full_info.t == cut_info.t
        assert_same(load_file(cut_info.path), load_file(full_info.path))
    # one process seeing the same global batches (per-device batch 4 = 2 ranks x 2) gets the same run
    from _hf_ddp_worker import RUN

    callback = EMACallback(**RUN["ema"])
    recorder = Recorder()
    trainer = train(tmp_path / "single", callback, recorder, **{**RUN["args"], "per_device_train_batch_size": 4})
    assert_same(ranks[0]["weights"], weights(trainer.model), exact=False)
    assert_same(ranks[0]["ema"], ema_params(callback), exact=False)
    assert ranks[0]["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)
