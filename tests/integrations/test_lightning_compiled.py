"""A LightningModule compiled with ``torch.compile`` validates on the EMA.

A peer's users saw validation frozen for epochs because a compiled forward kept reading the training weights
while an EMA callback swapped the average in. Here every logged ``val_loss`` of a compiled module is the loss of
the weights the callback swapped in, evaluated eagerly by hand, and those weights are the average; and
``ema_model``, a copy of the module whose ``forward`` Lightning compiled in place, computes with the average.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_worker import LIGHTNING_NOTICES, EvalRecorder, StepRecorder, make_loader, make_net, make_trainer

from emakit.integrations.lightning import EMACallback

pytestmark = pytest.mark.filterwarnings(*LIGHTNING_NOTICES)


def loss_of(weights: dict[str, torch.Tensor], loader: object) -> float:
    """Mean cross-entropy of a new eager module holding ``weights``, in eval mode. (Not a deepcopy of the fitted
    module: Lightning compiles that module's ``forward`` in place, and a copy would call the original's.)"""
    eager = make_net(batchnorm=False)
    eager.load_state_dict(weights)
    eager.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:  # type: ignore[attr-defined]
            total += float(nn.functional.cross_entropy(eager(x), y, reduction="sum"))
            count += len(x)
    return total / count


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_module_validates_on_the_ema(backend: str) -> None:
    torch._dynamo.reset()
    recorder, evals = StepRecorder(), EvalRecorder()
    callback = EMACallback(half_life="3ba")
    val = make_loader(n=16, batch_size=16, seed=5)
    model = make_net(batchnorm=False)
    trainer = make_trainer([recorder, callback, evals], max_epochs=2, val_check_interval=2)
    trainer.fit(torch.compile(model, backend=backend), make_loader(), val)

    assert evals.steps == [2, 4, 6, 8, 10, 12]
    smoothing = callback.averager.schedule.smoothing
    for step, during, before, logged in zip(evals.steps, evals.during, evals.before, evals.metrics, strict=True):
        # the swapped-in weights are the average of the training weights after steps 1..step, in float64
        average = {n: t.double() for n, t in recorder.after_step[0].items()}
        for state in recorder.after_step[1:step]:
            average = {n: smoothing * average[n] + (1 - smoothing) * state[n].double() for n in average}
        for name, value in average.items():
            torch.testing.assert_close(during[name].double(), value, rtol=0, atol=1e-6)
        # the compiled forward computed with them, not with the training weights
        assert logged == pytest.approx(loss_of(during, val), rel=1e-5)
        assert logged != pytest.approx(loss_of(before, val), rel=1e-5)
    # Lightning compiled the module's forward in place; ema_model is a copy of that module and runs the average
    assert "forward" in vars(model)
    eager = make_net(batchnorm=False)
    eager.load_state_dict(callback.averager.ema_tensors)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(callback.averager.ema_model(x), eager.eval()(x), rtol=0, atol=1e-6)
