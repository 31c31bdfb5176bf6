"""Write-back through the Transformers callback against a float64 oracle (a pull every step and a copy every
N steps), and a resume mid-run equal bit for bit to the uninterrupted run in emakit's Trainer, Lightning and
Transformers. Each resume starts between two copies, so it matches only if the copies' phase was restored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from _oracle import Weights

from conftest import make_loader, make_model
from emakit import EMA, Trainer
from emakit.averaging import Averager

SMOOTHING = 2 ** (-1 / 4)  # half_life='4ba', an update every optimizer step
EVERY, PULL = 4, 0.2


def averager() -> Averager:
    return EMA(half_life="4ba").write_back(every=f"{EVERY}ba", pull=PULL)


def expected_after(before: Sequence[Weights], every: int, pull: float) -> list[Weights]:
    """The training weights after each step's write-back, from those before it: the average starts at the
    first step (nothing written), then each step updates it and copies it in when ``every`` steps passed since
    the start or the last copy, else pulls the weights toward it by ``pull``."""
    average = {n: t.clone() for n, t in before[0].items()}
    after, last = [before[0]], 1
    for step, weights in enumerate(before[1:], start=2):
        average = {n: SMOOTHING * average[n] + (1 - SMOOTHING) * weights[n] for n in average}
        if step - last >= every:
            after.append({n: a.clone() for n, a in average.items()})
            last = step
        else:
            after.append({n: t + pull * (average[n] - t) for n, t in weights.items()})
    return after


def worst(actual: Sequence[Weights], expected: Sequence[Weights]) -> float:
    assert len(actual) == len(expected)
    return max((a[n] - e[n]).abs().max().item() for a, e in zip(actual, expected, strict=True) for n in e)


def assert_same_run(a: Averager, b: Averager, model_a: torch.nn.Module, model_b: torch.nn.Module) -> None:
    assert b.timestamp == a.timestamp and b.n_averaged == a.n_averaged
    assert b.state_dict()["write_back"] == a.state_dict()["write_back"]
    for name, tensor in a.ema_tensors.items():
        assert torch.equal(tensor, b.ema_tensors[name]), name
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name


# ---------------------------------------------------------------- emakit's Trainer


def test_emakits_trainer_resumes_write_back_bitwise(tmp_path: Path) -> None:
    def fit(**kwargs: Any) -> tuple[Trainer, Averager]:
        model, ema = make_model(0), averager()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = Trainer(model, make_loader(n=32), "4ep", algorithms=[ema], optimizers=optimizer,
                          progress_bar=False, **kwargs)  # fmt: skip
        trainer.fit()
        return trainer, ema

    whole, whole_ema = fit(save_folder=tmp_path, save_interval="3ba")
    assert whole_ema.writeback.num_copies == 3  # at steps 5, 9, 13 (started at step 1)
    resumed, resumed_ema = fit(load_path=tmp_path / "ep1-ba6.pt")  # between the copies of steps 5 and 9
    assert_same_run(whole_ema, resumed_ema, whole.state.model, resumed.state.model)


# ---------------------------------------------------------------- Lightning


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*GPU available.*", "ignore:.*litlogger.*", "ignore:.*LeafSpec.*"
)
def test_lightning_resumes_write_back_bitwise_from_an_epoch_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from test_rules_lightning import TokenModule, fit

    from emakit.integrations.lightning import AveragingCallback

    module, callback = TokenModule(), AveragingCallback(averager())
    fit([callback], module, tmp_path / "whole")
    assert callback.averager.writeback.num_copies == 4  # 18 steps: copies at 5, 9, 13, 17
    resumed_module, resumed = TokenModule(seed=123), AveragingCallback(averager())
    # epoch 0 ends at step 6, between the copies of steps 5 and 9
    fit([resumed], resumed_module, tmp_path / "resumed", ckpt=tmp_path / "whole" / "epoch=0.ckpt")
    assert_same_run(callback.averager, resumed.averager, module, resumed_module)


# ---------------------------------------------------------------- Transformers


def _transformers() -> Any:
    pytest.importorskip("transformers")
    import test_rules_transformers

    return test_rules_transformers


def test_the_transformers_callback_pulls_and_copies_every_n_steps_like_the_oracle(tmp_path: Path) -> None:
    hf = _transformers()
    from emakit.integrations.transformers import AveragingCallback

    callback = AveragingCallback(averager())
    before = hf.Recorder(torch.nn.Linear(1, 1))  # listed first: the weights before the averager's step
    _, after = hf.run(tmp_path, [before, callback])
    steps = len(hf.RAMP) * hf.EPOCHS
    assert len(before.recorded) == len(after) == steps + 1
    expected = expected_after(before.recorded[1:], EVERY, PULL)
    error = worst(after[1:], expected)
    print(f"Transformers, pull {PULL} + a copy every {EVERY} steps: max |weights - float64 oracle| = {error:.2e}")
    assert error < 1e-6
    assert callback.averager.writeback.num_copies == 2 and callback.averager.writeback.num_pulls == steps - 3
    assert worst(after[5:6], before.recorded[5:6]) > 1e-4  # the copy at step 5 moved the weights


def test_transformers_resumes_write_back_bitwise_mid_epoch(tmp_path: Path) -> None:
    hf = _transformers()
    from emakit.integrations.transformers import AveragingCallback

    saving = {"save_strategy": "steps", "save_steps": 7}
    callback = AveragingCallback(averager())
    whole, _ = hf.run(tmp_path / "whole", [callback], **saving)
    cut = AveragingCallback(averager())
    hf.run(tmp_path / "cut", [cut, hf.StopAt(7)], **saving)
    assert cut.averager.writeback.num_copies == 1  # at step 5; the next falls at step 9
    resumed = AveragingCallback(averager())
    again, _ = hf.run(tmp_path / "cut", [resumed], resume=str(tmp_path / "cut" / "checkpoint-7"), seed=123, **saving)
    assert_same_run(callback.averager, resumed.averager, whole.model, again.model)
