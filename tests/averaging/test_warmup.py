"""EMA warm-up: the smoothing sequence of timm's ModelEmaV3(use_warmup=True) and diffusers' EMAModel
(use_ema_warmup=True), compared update by update on the resulting averages; exact across a resume."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from emakit.averaging import EMA, Warmup

STEPS = 40


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def training(model: nn.Module, steps: int = STEPS, first: int = 1) -> Iterator[int]:
    """SGD on seeded batches (batch ``k`` is the same in every run), yielding the step count after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    model.train()
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        yield step


def timm_model_ema() -> Any:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install timm --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location(
        "_warmup_timm_model_ema", path
    )  # `import timm` needs torchvision
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], where: str) -> None:
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{where} {n}: {m}")


@pytest.mark.parametrize(("gamma", "power", "after"), [(1.0, 2 / 3, 0), (3.0, 0.75, 4), (0.5, 1.0, 0)])
def test_warmup_is_timm_model_ema_v3(gamma: float, power: float, after: int) -> None:
    decay = 0.8  # reached by the ramp within the run, so the cap is exercised too
    model = make_model()
    theirs = timm_model_ema().ModelEmaV3(
        model, decay=decay, use_warmup=True, warmup_gamma=gamma, warmup_power=power, update_after_step=after
    )
    ema = EMA(smoothing=decay, ema_start=f"{after + 1}ba", warmup=Warmup(gamma=gamma, power=power))
    ema.attach(model)
    for step in training(model):
        theirs.update(model, step=step)
        ema.step()
        if ema.started:
            assert_close(ema.ema_tensors, theirs.module.state_dict(), f"step {step}")
    assert theirs.get_decay(STEPS) == decay  # the cap was reached


@pytest.mark.parametrize(("gamma", "power", "after"), [(1.0, 2 / 3, 0), (2.0, 0.75, 3)])
def test_warmup_is_diffusers_ema_model(gamma: float, power: float, after: int) -> None:
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    from diffusers.training_utils import EMAModel

    decay = 0.8
    model = make_model()
    theirs = EMAModel(
        model.parameters(), decay=decay, use_ema_warmup=True, inv_gamma=gamma, power=power, update_after_step=after
    )
    ema = EMA(smoothing=decay, ema_start=f"{after + 1}ba", warmup=Warmup(gamma=gamma, power=power))
    ema.attach(model)
    names = [name for name, _ in model.named_parameters()]
    for step in training(model):
        theirs.step(model.parameters())
        ema.step()
        if ema.started:
            assert_close(ema.ema_tensors, dict(zip(names, theirs.shadow_params, strict=True)), f"step {step}")


def test_warmup_true_is_the_default_ramp_and_caps_a_half_life() -> None:
    """warmup=True: gamma 1, power 2/3; each average of a half_life list is capped by its own smoothing."""
    ema = EMA(half_life=["2ba", "50ba"], warmup=True)
    assert ema.schedule.warmup == Warmup(1.0, 2 / 3)
    for t in (2, 5, 50, 5000):
        ramp = 1 - (1 + (t - 1)) ** (-2 / 3)
        smoothings = [2 ** (-1 / 2), 2 ** (-1 / 50)]
        expected = [1 - min(s, ramp) for s in smoothings]
        assert ema.schedule.weights(t) == pytest.approx(expected, rel=1e-12)
    ramped = ema.schedule.weights(10**7)
    assert ramped[1] == 1 - 2 ** (-1 / 50)  # exactly the plain weight once ramped


def test_warmup_resumes_exactly() -> None:
    """The ramp is a function of the update count, which the state carries: a resumed run is bitwise the same."""
    model = make_model()
    whole = EMA(smoothing=0.99, warmup=Warmup(gamma=2.0, power=0.75))
    whole.attach(model)
    for _ in training(model, 20):
        whole.step()

    model = make_model()
    first = EMA(smoothing=0.99, warmup=Warmup(gamma=2.0, power=0.75))
    first.attach(model)
    for _ in training(model, 8):
        first.step()
    state = {k: v for k, v in first.state_dict().items()}
    resumed = EMA(smoothing=0.99, warmup=Warmup(gamma=2.0, power=0.75))
    resumed.attach(model)
    resumed.load_state_dict(state)
    opt_model = model  # the optimizer is plain SGD without momentum: a new one continues exactly
    for _ in training(opt_model, 12, first=9):
        resumed.step()
    for name, t in whole.ema_tensors.items():
        assert torch.equal(resumed.ema_tensors[name], t), name


@given(gamma=st.floats(0.01, 100), power=st.floats(0.05, 2), blends=st.integers(0, 10**9))
def test_warmup_ramp_is_the_closed_form(gamma: float, power: float, blends: int) -> None:
    ramp = Warmup(gamma=gamma, power=power).smoothing(blends)
    expected = 0.0 if blends == 0 else 1 - math.exp(-power * math.log1p(blends / gamma))
    assert ramp == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 <= ramp < 1.0 or (ramp == 1.0 and blends / gamma > 1e15 ** (1 / power))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": "yes"}, "warmup must be a bool"),
        ({"warmup": True, "sigma_rel": 0.1, "half_life": None}, "sigma_rel profile has its own ramp"),
        ({"warmup": True, "snapshot_interval": "1ba", "snapshot_folder": "x"}, "give warmup or snapshot_folder"),
    ],
)
def test_warmup_refuses(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        EMA(**kwargs)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
def test_warmup_refuses_bad_numbers(bad: Any) -> None:
    with pytest.raises(ValueError, match="gamma must be a finite number greater than 0"):
        Warmup(gamma=bad)
    with pytest.raises(ValueError, match="power must be a finite number greater than 0"):
        Warmup(power=bad)
