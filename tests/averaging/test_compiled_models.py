"""A compiled model evaluates the average: the swap and ``ema_model`` reach ``torch.compile``'s graphs.

A peer's users saw validation frozen for epochs because a compiled forward kept reading the weights it was
compiled with. emakit's swap writes the averaged values into the model's own tensors (flattened or not), and
``ema_model``'s tensors are the average's storage, updated in place; compiled graphs read those tensors at every
call. Each output is compared with an eager copy of the model loaded with the averaged tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from emakit import EMA

BACKENDS = ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train(model: nn.Module, forward: nn.Module, ema: EMA, steps: int, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        forward(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.step()


def eager_average(model: nn.Module, ema: EMA) -> nn.Module:
    """An eager copy of ``model`` holding the averaged tensors, in eval mode."""
    reference = copy.deepcopy(model)
    reference.load_state_dict({**reference.state_dict(), **ema.ema_tensors})
    return reference.eval()


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_forward_sees_the_swapped_average(backend: str, flatten: bool) -> None:
    torch._dynamo.reset()
    model = make()
    ema = EMA(half_life="2ba", flatten_model=flatten)
    ema.attach(model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    for round_ in range(3):  # the graphs of the first round, reused across swaps and further training
        with torch._dynamo.config.patch(error_on_recompile=round_ > 0):
            train(model, compiled, ema, 4, seed=round_)
            model.eval()
            with torch.no_grad():
                live = compiled(x).clone()
                with ema.average_parameters():
                    swapped = compiled(x).clone()
                after = compiled(x).clone()
            model.train()
        with torch.no_grad():
            expected = eager_average(model.eval(), ema)(x)
        model.train()
        torch.testing.assert_close(swapped, expected, rtol=0, atol=1e-6)
        assert (swapped - live).abs().max() > 1e-3  # the average differs from the training weights here
        assert torch.equal(after, live)  # and the training weights are back


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_ema_model_follows_every_update(backend: str) -> None:
    torch._dynamo.reset()
    model = make()
    ema = EMA(half_life="2ba")
    ema.attach(model)
    train(model, model, ema, 1, seed=0)
    teacher = torch.compile(ema.ema_model, backend=backend)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    outputs = []
    for round_ in range(3):
        train(model, model, ema, 3, seed=round_ + 1)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=round_ > 0):
            out = teacher(x).clone()
            torch.testing.assert_close(out, eager_average(model, ema)(x), rtol=0, atol=1e-6)
        outputs.append(out)
    assert (outputs[0] - outputs[-1]).abs().max() > 1e-3  # the teacher moved with the average


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_model_of_a_model_compiled_in_place_runs_the_average(backend: str) -> None:
    """``model.forward = torch.compile(model.forward)`` (Lightning does this for a compiled LightningModule)
    stores a function bound to the model in the model itself: a copy holding it would run the training weights."""
    torch._dynamo.reset()
    model = make()
    model.forward = torch.compile(model.forward, backend=backend)  # type: ignore[method-assign]
    ema = EMA(half_life="2ba")
    ema.attach(model)
    train(model, model, ema, 4, seed=0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        teacher = ema.ema_model(x)
        expected = eager_average(model, ema)
        del expected.__dict__["forward"]  # the eager copy runs its class's forward too
        model.eval()
        training = model(x)
    torch.testing.assert_close(teacher, expected(x), rtol=0, atol=1e-6)
    assert (teacher - training).abs().max() > 1e-3
    assert "forward" in vars(model)  # the model itself keeps its compiled forward
