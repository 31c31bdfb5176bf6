"""From the Lightning callback, ``params`` reaches the tracked-set owner once per event.

The selection is parsed once, when the callback is built, and :class:`~emakit.averaging.tracked.TrackedModel`
applies it at three events only: attach (each fit), the start of the average, and the load of a started state.
No training step applies it again. The counts come from the real selection function, wrapped; the average is
checked against a float64 EMA of the selected tensors so that the counted run is a working one.
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_worker import LIGHTNING_NOTICES, StepRecorder, make_loader, make_net, make_trainer

import emakit.averaging.ema as ema_module
import emakit.averaging.tracked as tracked_module
from emakit.integrations.lightning import EMACallback

pytestmark = pytest.mark.filterwarnings(*LIGHTNING_NOTICES)

PARAMS = ["fc1.*", "fc2.weight"]


def _hook() -> str:
    """The Lightning callback hook on the stack, and the TrackedModel event that called the selection."""
    hook, event = "?", "?"
    for frame in inspect.stack()[2:]:
        if frame.filename == tracked_module.__file__ and event == "?":
            event = frame.function
        if frame.filename.endswith("integrations/lightning.py"):
            hook = frame.function
            break
    return f"{hook}>{event}"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[str], Counter[str]]:
    decisions: Counter[str] = Counter()
    parses: Counter[str] = Counter()
    decide, parse = tracked_module.decide, ema_module.parse_selection

    def counting_decide(*args: Any, **kwargs: Any) -> Any:
        decisions[_hook()] += 1
        return decide(*args, **kwargs)

    def counting_parse(*args: Any, **kwargs: Any) -> Any:
        parses["parse"] += 1
        return parse(*args, **kwargs)

    monkeypatch.setattr(tracked_module, "decide", counting_decide)
    monkeypatch.setattr(ema_module, "parse_selection", counting_parse)
    return decisions, parses


def test_params_enters_the_tracked_set_once_per_event(
    counted: tuple[Counter[str], Counter[str]], tmp_path: Path
) -> None:
    decisions, parses = counted
    callback = EMACallback(half_life="3ba", ema_start="2ba", params=PARAMS)
    assert parses == {"parse": 1}
    assert not decisions

    recorder = StepRecorder()
    trainer = make_trainer([callback, recorder], max_epochs=1, max_steps=4)
    trainer.fit(make_net(batchnorm=False), make_loader(n=48, batch_size=8))
    # One attach when the fit starts, one choice when the average starts at step 2, none at the other steps.
    assert decisions == {"on_fit_start>attach": 1, "on_train_batch_end>start": 1}

    expected = float64_ema(recorder.after_step, callback.averager.schedule.weights, start=2)
    assert set(callback.averager.ema_tensors) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(callback.averager.ema_tensors[name].double(), value, atol=1e-6, rtol=0)

    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    decisions.clear()
    resumed = EMACallback(half_life="3ba", ema_start="2ba", params=PARAMS)
    assert parses == {"parse": 2}
    trainer = make_trainer([resumed], max_epochs=1, max_steps=6)
    trainer.fit(make_net(batchnorm=False), make_loader(n=48, batch_size=8), ckpt_path=path)
    # The resumed fit attaches once and takes the saved state's set once (the callback loads the state it was
    # handed when the fit starts, once the model is attached); the started average never chooses again.
    assert decisions == {"on_fit_start>attach": 1, "on_fit_start>select_saved": 1}, decisions
    assert set(resumed.averager.ema_tensors) == set(expected)


def float64_ema(after_step: list[dict[str, torch.Tensor]], weight: Any, start: int) -> dict[str, torch.Tensor]:
    """The selected tensors' EMA in float64: a copy at optimizer step ``start``, then ``lerp`` by the schedule's
    weight for the ``n``-th model averaged."""
    selected = [n for n in after_step[0] if n.startswith("fc1.") or n == "fc2.weight"]
    average = {n: after_step[start - 1][n].double() for n in selected}
    for n_averaged, state in enumerate(after_step[start:], start=2):
        (w,) = weight(n_averaged)
        average = {n: average[n] + w * (state[n].double() - average[n]) for n in selected}
    return average
