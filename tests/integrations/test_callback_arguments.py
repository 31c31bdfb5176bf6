"""Both framework callbacks take exactly :class:`emakit.EMA`'s arguments (one signature, no ``**kwargs``), and
post-hoc EMA through them writes the snapshots an EMA in a hand-written loop writes over the same weights;
a resumed run's snapshot folder equals an uninterrupted run's (no gap, no duplicate)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from emakit import EMA
from emakit.posthoc import read_snapshot_index

sys.path.insert(0, str(Path(__file__).resolve().parent))

OWN = {
    "lightning": {"weights_after_fit", "count_samples", "count_tokens"},
    "transformers": {"save_ema_as_model", "eval_with_ema"},
}


def callback_class(framework: str) -> Any:
    pytest.importorskip(framework)
    if framework == "lightning":
        from emakit.integrations.lightning import EMACallback
    else:
        from emakit.integrations.transformers import EMACallback
    return EMACallback


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_each_callback_takes_every_argument_of_ema_with_its_default(framework: str) -> None:
    ema = inspect.signature(EMA.__init__).parameters
    mine = inspect.signature(callback_class(framework).__init__).parameters
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in mine.values())
    assert set(mine) - OWN[framework] == set(ema)
    for name, parameter in ema.items():
        assert mine[name].default == parameter.default, name
    for name in list(ema)[: list(ema).index("overlap") + 1]:  # the positional ones, in order
        assert list(mine).index(name) == list(ema).index(name)


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_selection_and_several_averages_reach_the_ema(framework: str) -> None:
    callback = callback_class(framework)(
        sigma_rel=[0.05, 0.1], eval_average=1, params=["*.weight"], buffers={"*": "copy"}
    )
    assert callback.averager.schedule.num_averages == 2 and callback.averager.eval_average == 1
    assert callback.averager._tracked.selection.params == ("*.weight",)


def snapshots(folder: Path) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
    """(step, t, tensors) of every snapshot in ``folder``, in order."""
    return [(info.step, info.t, load_file(info.path)) for info in read_snapshot_index(folder)]


def assert_same_snapshots(got: Path, expected: Path) -> None:
    a, b = snapshots(got), snapshots(expected)
    assert [(s, t) for s, t, _ in a] == [(s, t) for s, t, _ in b]
    assert len(a) > 1
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in y:
            assert torch.equal(x[key], y[key]), key


def replay(model: nn.Module, records: list[dict[str, torch.Tensor]], **settings: Any) -> None:
    """The EMA in a hand-written loop, stepped once per recorded optimizer step."""
    ema = EMA(**settings)
    ema.attach(model)
    for state in records:
        model.load_state_dict(state)
        ema.step()


POSTHOC = {"sigma_rel": [0.05, 0.12], "snapshot_interval": "2ba"}


def test_lightning_posthoc_snapshots_equal_a_hand_loop(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from _lightning_worker import StepRecorder, make_loader, make_net, make_trainer

    from emakit.integrations.lightning import EMACallback

    recorder = StepRecorder()
    settings = dict(POSTHOC, params=["fc2.*", "fc1.weight"], buffers={"bn.running_var": "copy"})
    callback = EMACallback(**settings, snapshot_folder=tmp_path / "fit")  # type: ignore[arg-type]
    make_trainer([callback, recorder], max_epochs=2).fit(make_net(), make_loader())
    replay(make_net(seed=5), recorder.after_step, **settings, snapshot_folder=tmp_path / "loop")
    assert_same_snapshots(tmp_path / "fit", tmp_path / "loop")
    assert not any("fc1.bias" in key for key in snapshots(tmp_path / "fit")[0][2])  # not selected: not written


def test_transformers_posthoc_snapshots_equal_a_hand_loop_and_resume_without_gap(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from _hf_common import StopAt, TokenData, tiny_model, training_args
    from transformers import TrainerCallback

    from emakit.integrations.transformers import EMACallback, EMATrainer

    class FullRecorder(TrainerCallback):  # type: ignore[misc]
        """The whole state_dict after every optimizer step."""

        def __init__(self) -> None:
            self.after_step: list[dict[str, torch.Tensor]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.after_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def train(out: Path, folder: Path, *extra: Any, resume: Any = None) -> None:
        run = {"max_steps": 8, "save_strategy": "steps", "save_steps": 5, "gradient_accumulation_steps": 2}
        callback = EMACallback(**POSTHOC, snapshot_folder=folder)  # type: ignore[arg-type]
        trainer = EMATrainer(
            model=tiny_model(),
            args=training_args(out, **run),
            train_dataset=TokenData(40),
            callbacks=[callback, *extra],
        )
        trainer.train(resume_from_checkpoint=resume)

    recorder = FullRecorder()
    train(tmp_path / "full", tmp_path / "snaps-full", recorder)
    replay(tiny_model(seed=3), recorder.after_step, **POSTHOC, snapshot_folder=tmp_path / "snaps-loop")
    assert_same_snapshots(tmp_path / "snaps-full", tmp_path / "snaps-loop")

    # cut after step 6 (checkpoint at 5, snapshot at 6 written), resumed from checkpoint-5: the step-6
    # snapshot is dropped and written again, the folder ends up as the uninterrupted run's
    train(tmp_path / "cut", tmp_path / "snaps-cut", StopAt(6))
    assert [info.step for info in read_snapshot_index(tmp_path / "snaps-cut")] == [2, 4, 6]
    train(tmp_path / "cut", tmp_path / "snaps-cut", resume=str(tmp_path / "cut" / "checkpoint-5"))
    assert_same_snapshots(tmp_path / "snaps-cut", tmp_path / "snaps-full")


def test_lightning_posthoc_snapshots_resume_without_gap_or_duplicate(tmp_path: Path) -> None:
    """Cut after epoch 2 of 3 (snapshots up to step 12), resumed from the epoch-1 checkpoint (step 6): the
    snapshots after step 6 are dropped and written again, and the folder equals the uninterrupted run's."""
    pytest.importorskip("lightning")
    from _lightning_worker import make_loader, make_net, make_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from emakit.integrations.lightning import EMACallback

    def fit(max_epochs: int, snapshots: Path, checkpoints: Path, ckpt_path: Path | None = None) -> None:
        callback = EMACallback(**POSTHOC, snapshot_folder=snapshots)  # type: ignore[arg-type]
        saver = ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer([callback, saver], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(make_net(), make_loader(), ckpt_path=ckpt_path)

    fit(3, tmp_path / "snaps-full", tmp_path / "ckpt-full")
    fit(2, tmp_path / "snaps-cut", tmp_path / "ckpt-cut")
    assert [info.step for info in read_snapshot_index(tmp_path / "snaps-cut")] == [2, 4, 6, 8, 10, 12]
    fit(3, tmp_path / "snaps-cut", tmp_path / "ckpt-resumed", ckpt_path=tmp_path / "ckpt-cut" / "epoch=0.ckpt")
    assert_same_snapshots(tmp_path / "snaps-cut", tmp_path / "snaps-full")
