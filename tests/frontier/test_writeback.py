"""Writing the average back into the training weights (Switch-EMA copies, a per-update pull) in a hand loop.

The oracle reads the training weights recorded just before each ``averager.step()`` (what the average blends),
computes the average in float64 from the published rule, and predicts the weights the write-back leaves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_bema import bema_oracle, corrected
from torch import nn

import emakit.averaging.tracked
from emakit import BEMA, EMA, SWA
from emakit.averaging import Averager

Weights = dict[str, torch.Tensor]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def floating(model: nn.Module) -> Weights:
    """The model's floating tensors (parameters and BatchNorm statistics) in float64."""
    return {n: t.detach().to(torch.float64).clone() for n, t in model.state_dict().items() if t.is_floating_point()}


def run(
    averager: Averager,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    epoch_length: int | None = None,
) -> tuple[list[Weights], list[Weights]]:
    """Adam on a fixed regression task; the weights before each ``averager.step()`` and after it (and after
    ``epoch_end()`` every ``epoch_length`` steps)."""
    before, after = [], []
    for step in steps:
        train_step(model, optimizer, step)
        before.append(floating(model))
        averager.step()
        if epoch_length is not None and (step + 1) % epoch_length == 0:
            averager.epoch_end()
        after.append(floating(model))
    return before, after


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One optimizer step on the step's own batch of a fixed regression task (in the model's dtype)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=g).to(next(model.parameters()).dtype)
    loss = (model(x) - x[:, :3].sin()).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def setup(averager: Averager, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model(seed)
    averager.attach(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def oracle(
    before: list[Weights], weight: float, written: Callable[[int], float], names: set[str] | None = None
) -> tuple[Weights, list[Weights]]:
    """The float64 average (a copy of ``before[0]``, then ``(1 - weight) * avg + weight * theta`` per step) and
    the weights after each step's write-back: ``theta + written(k) * (avg - theta)`` for the ``names`` written."""
    average = {n: v.clone() for n, v in before[0].items()}
    expected = [before[0]]
    for k in range(1, len(before)):
        average = {n: (1 - weight) * average[n] + weight * before[k][n] for n in average}
        lam = written(k)
        expected.append(
            {n: t + lam * (average[n] - t) if names is None or n in names else t for n, t in before[k].items()}
        )
    return average, expected


def worst(actual: list[Weights], expected: list[Weights]) -> float:
    return max((a[n] - e[n]).abs().max().item() for a, e in zip(actual, expected, strict=True) for n in e)


WEIGHT = 1 - 2 ** (-1 / 4)  # half_life='4ba', one update per step


def test_copy_every_n_steps_follows_the_float64_oracle() -> None:
    ema = EMA(half_life="4ba").write_back(every="3ba")
    model, optimizer = setup(ema)
    before, after = run(ema, model, optimizer, range(13))
    average, expected = oracle(before, WEIGHT, lambda k: 1.0 if k % 3 == 0 else 0.0)
    error = worst(after, expected)
    print(f"copy every 3 steps: max |weights - oracle| = {error:.2e}")
    assert error < 1e-6
    assert max((ema.ema_tensors[n].double() - average[n]).abs().max().item() for n in average) < 1e-6
    assert ema.writeback.num_copies == 4 and ema.writeback.num_pulls == 0
    moved = [k for k in range(13) if any(not torch.equal(after[k][n], before[k][n]) for n in before[k])]
    assert moved == [3, 6, 9, 12]  # the steps 3, 6, 9, 12 after the start wrote, and only they


def test_pull_after_every_update_follows_the_float64_oracle() -> None:
    ema = EMA(half_life="4ba").write_back(pull=0.3)
    model, optimizer = setup(ema)
    before, after = run(ema, model, optimizer, range(12))
    average, expected = oracle(before, WEIGHT, lambda k: 0.3)
    error = worst(after, expected)
    print(f"pull 0.3: max |weights - oracle| = {error:.2e}")
    assert error < 1e-6
    assert max((ema.ema_tensors[n].double() - average[n]).abs().max().item() for n in average) < 1e-6
    assert ema.writeback.num_pulls == 11  # every update after the start
    # the pull moved the weights: the run differs from one without write-back
    plain = EMA(half_life="4ba")
    model, optimizer = setup(plain)
    _, unpulled = run(plain, model, optimizer, range(12))
    assert worst(after, unpulled) > 1e-3


def test_copies_at_epoch_ends_with_updates_every_step() -> None:
    ema = EMA(half_life="4ba").write_back(every="1ep")
    model, optimizer = setup(ema)
    before, after = run(ema, model, optimizer, range(12), epoch_length=4)
    _, expected = oracle(before, WEIGHT, lambda k: 1.0 if (k + 1) % 4 == 0 else 0.0)
    assert worst(after, expected) < 1e-6
    assert ema.writeback.num_copies == 3


def test_a_bf16_model_gets_its_fp32_average_rounded_once() -> None:
    model = make_model().to(torch.bfloat16)
    ema = EMA(half_life="4ba").write_back(every="3ba", pull=0.3)  # the average is kept in fp32
    ema.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(7):
        train_step(model, optimizer, step)
        before = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
        ema.step()
        average = ema.ema_tensors
        for name, theta in before.items():
            got = model.state_dict()[name]
            assert got.dtype == torch.bfloat16 and average[name].dtype == torch.float32
            if step in (3, 6):  # the copies: the fp32 average rounded to bf16
                assert torch.equal(got, average[name].to(torch.bfloat16)), name
            elif step > 0:  # the pulls, within bf16 rounding (8 significant bits) of the float64 value
                exact = theta.double() + 0.3 * (average[name].double() - theta.double())
                scale = torch.maximum(theta.double().abs(), average[name].double().abs())
                assert ((got.double() - exact).abs() <= 2**-7 * scale + 1e-6).all(), name
    assert ema.writeback.num_copies == 2 and ema.writeback.num_pulls == 4


def test_several_averages_write_back_the_one_named() -> None:
    ema = EMA(half_life=["2ba", "8ba"]).write_back(every="5ba", average=1)
    model, optimizer = setup(ema)
    before, after = run(ema, model, optimizer, range(11))
    slow = 1 - 2 ** (-1 / 8)
    _, expected = oracle(before, slow, lambda k: 1.0 if k % 5 == 0 else 0.0)
    assert worst(after, expected) < 1e-6
    _, fast = oracle(before, 1 - 2 ** (-1 / 2), lambda k: 1.0 if k % 5 == 0 else 0.0)
    assert worst(after, fast) > 1e-4  # not the evaluated average 0
    assert ema.eval_average == 0


def test_bema_writes_back_its_bias_corrected_weights() -> None:
    bema = BEMA(rho=5.0, gamma=1.5, kappa=0.6, eta=0.3, update_interval="1ba").write_back(every="3ba")
    model, optimizer = setup(bema)
    before, after = run(bema, model, optimizer, range(8))
    recorded = [before[0], *before]  # recorded[step]: the weights the step's update saw (step 1 starts)
    states = bema_oracle(recorded, 5.0, 1.5, 0.6, 0.3, start=1, every=1)
    for k in range(8):
        state = states[k + 1]
        assert state is not None
        expected = corrected(state, before[k]) if k in (3, 6) else before[k]  # copies at steps 4 and 7
        assert max((after[k][n] - expected[n]).abs().max().item() for n in expected) < 2e-6, k
    assert bema.writeback.num_copies == 2


def test_only_the_tracked_averaged_tensors_are_written() -> None:
    # the first layer tracked (a glob), the BatchNorm statistics copied rather than averaged: the last layer
    # trains untracked and the statistics keep their training values
    ema = EMA(half_life="4ba", params=["0.*"], buffers="copy").write_back(every="2ba")
    model, optimizer = setup(ema)
    before, after = run(ema, model, optimizer, range(7))
    written = {"0.weight", "0.bias"}
    _, expected = oracle(before, WEIGHT, lambda k: 1.0 if k % 2 == 0 else 0.0, names=written)
    assert worst(after, expected) < 1e-6
    for k in range(7):
        for name in before[k]:
            if name not in written:
                assert torch.equal(after[k][name], before[k][name]), name
    assert any(not torch.equal(after[6][n], before[6][n]) for n in written)


def test_frozen_parameters_are_not_written() -> None:
    model = make_model()
    model[3].bias.requires_grad_(False)
    with torch.no_grad():
        model[3].bias.fill_(0.5)
    ema = EMA(half_life="4ba").write_back(pull=1.0)
    ema.attach(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with torch.no_grad():  # a value the average never saw: written back, it would change
        ema.step()
        model[3].bias.fill_(0.25)
    run(ema, model, optimizer, range(3))
    assert "3.bias" not in ema.ema_tensors
    assert torch.equal(model[3].bias, torch.full((3,), 0.25))


def test_nothing_is_written_before_swas_window_opens() -> None:
    swa = SWA(swa_start="4ba", update_interval="1ba").write_back(every="2ba")
    model, optimizer = setup(swa)
    before, after = run(swa, model, optimizer, range(9))
    for k in range(3):  # steps 1-3: no window, no average, nothing written
        assert all(torch.equal(after[k][n], before[k][n]) for n in before[k])
    assert swa.start_count == 4
    for k in (5, 7):  # steps 6 and 8: the mean of the window's models (from step 4 on) is copied in
        mean = {n: torch.stack([before[i][n] for i in range(3, k + 1)]).mean(0) for n in before[3]}
        assert max((after[k][n] - mean[n]).abs().max().item() for n in mean) < 1e-6
    assert swa.writeback.num_copies == 2


def test_resume_mid_run_is_bitwise() -> None:
    def averager() -> EMA:
        return EMA(half_life="4ba").write_back(every="3ba", pull=0.2, optimizer_state="reset")

    ema = averager()
    model, optimizer = setup(ema)
    run(ema, model, optimizer, range(12))

    first = averager()
    model_a, optimizer_a = setup(first)
    run(first, model_a, optimizer_a, range(5))  # mid-phase: the last copy was at step 4, the next is at 7
    saved = copy.deepcopy((model_a.state_dict(), optimizer_a.state_dict(), first.state_dict()))
    assert saved[2]["write_back"] == {"last": 4, "num_copies": 1, "num_pulls": 3}
    resumed = averager()
    model_b, optimizer_b = setup(resumed, seed=1)  # other initial weights, overwritten by the load
    model_b.load_state_dict(saved[0])
    optimizer_b.load_state_dict(saved[1])
    resumed.load_state_dict(saved[2])
    run(resumed, model_b, optimizer_b, range(5, 12))

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name
    for name, tensor in ema.ema_tensors.items():
        assert torch.equal(tensor, resumed.ema_tensors[name]), name
    assert (
        resumed.state_dict()["write_back"]
        == ema.state_dict()["write_back"]
        == {
            "last": 10,
            "num_copies": 3,
            "num_pulls": 8,
        }
    )


# ---------------------------------------------------------------------- the optimizer's state after a copy
def adam_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return copy.deepcopy(optimizer.state_dict()["state"])


def step_once(averager: Averager, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Any:
    """One training step; returns the optimizer's state just before ``averager.step()``."""
    train_step(model, optimizer, step)
    state = adam_state(optimizer)
    averager.step()
    return state


def test_keep_leaves_the_optimizer_state_as_it_was() -> None:
    ema = EMA(half_life="4ba").write_back(every="2ba")  # optimizer_state='keep' by default
    model, optimizer = setup(ema)
    step_once(ema, model, optimizer, 0)
    state = step_once(ema, model, optimizer, 1)
    assert ema.writeback.num_copies == 0
    state = step_once(ema, model, optimizer, 2)
    assert ema.writeback.num_copies == 1
    after = adam_state(optimizer)
    assert after.keys() == state.keys()
    for key in state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after[key][field], state[key][field])
    assert float(after[0]["step"]) == 3.0  # the step count went on


def test_reset_clears_the_written_parameters_state_only() -> None:
    ema = EMA(half_life="4ba", params=["0.*"]).write_back(every="2ba", optimizer_state="reset")
    model, optimizer = setup(ema)
    for step in range(3):
        before = step_once(ema, model, optimizer, step)
    assert ema.writeback.num_copies == 1
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    for name, p in model.named_parameters():
        if name.startswith("0."):
            assert len(optimizer.state[p]) == 0, name  # written: the state is gone
        else:
            assert torch.equal(optimizer.state[p]["exp_avg"], before[ids[id(p)]]["exp_avg"]), name
    step_once(ema, model, optimizer, 3)  # the next step starts the written parameters afresh
    assert float(optimizer.state[model[0].weight]["step"]) == 1.0
    assert float(optimizer.state[model[3].weight]["step"]) == 4.0


def test_a_hook_gets_the_written_parameters_and_their_optimizer() -> None:
    calls: list[tuple[list[str], list[torch.optim.Optimizer]]] = []

    def hook(params: dict[str, torch.Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        calls.append((sorted(params), optimizers))
        for optimizer in optimizers:  # e.g. keep the second moments, zero the first
            for p in params.values():
                optimizer.state[p]["exp_avg"].zero_()

    ema = EMA(half_life="4ba", params=["3.*"]).write_back(every="2ba", optimizer_state=hook)
    model, optimizer = setup(ema)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # steps other parameters: not given
    other.step()
    for step in range(5):
        step_once(ema, model, optimizer, step)
    assert calls == [(["3.bias", "3.weight"], [optimizer])] * 2
    assert torch.count_nonzero(optimizer.state[model[3].weight]["exp_avg"]) == 0
    assert torch.count_nonzero(optimizer.state[model[0].weight]["exp_avg"]) > 0


def test_reset_without_an_optimizer_stepping_the_parameters_is_refused() -> None:
    model = make_model()
    ema = EMA(half_life="4ba").write_back(every="1ba", optimizer_state="reset")
    ema.attach(model)
    ema.step()
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match=r"optimizer_state='reset'\): no optimizer holding the written"):
        ema.step()


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"give every= .* pull= .* got neither"),
        ({"pull": 0}, r"pull must be a number in \(0, 1\] .* got 0"),
        ({"pull": -0.5}, r"pull must be a number in \(0, 1\] .* got -0.5"),
        ({"pull": 1.5}, r"pull must be a number in \(0, 1\] .* got 1.5"),
        ({"pull": float("nan")}, r"pull must be a number in \(0, 1\] .* got nan"),
        ({"pull": True}, r"pull must be a number in \(0, 1\] .* got True"),
        ({"pull": "0.5"}, r"pull must be a number in \(0, 1\] .* got '0.5'"),
        ({"every": "0ba"}, r"every must be greater than 0, got '0ba'"),
        ({"every": "-2ba"}, r"every must be greater than 0, got '-2ba'"),
        ({"every": "0.5dur"}, r"every: got '0.5dur'; accepted units: 'ba', 'ep'"),
        ({"every": "100sp"}, r"every: got '100sp'; accepted units: 'ba', 'ep'"),
        ({"every": 3}, r"every"),
        ({"every": "3ba", "average": 1}, r"average must be None .* index into the 1 tracked average\(s\), got 1"),
        ({"every": "3ba", "optimizer_state": "zero"}, r"optimizer_state must be 'keep', 'reset' or a callable"),
        ({"pull": 0.1, "optimizer_state": "reset"}, r"optimizer_state='reset' applies to the copies of every="),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        EMA(half_life="4ba").write_back(**kwargs)


def test_every_must_fall_on_updates() -> None:
    with pytest.raises(ValueError, match=r"every must be a multiple of update_interval='2ba', got '3ba'"):
        EMA(half_life="8ba", update_interval="2ba").write_back(every="3ba")
    with pytest.raises(ValueError, match=r"every='10ba' is in 'ba' but the average updates every '1ep'"):
        SWA(update_interval="1ep").write_back(every="10ba")
    EMA(half_life="8ba", update_interval="2ba").write_back(every="4ba")
    SWA(update_interval="1ep").write_back(every="2ep")


def test_a_zero3_partition_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # ZeRO-3 detection stands in for DeepSpeed here: the refusal is the averager's, before any write
    monkeypatch.setattr(emakit.averaging.tracked, "is_zero3_model", lambda model: True)
    ema = EMA(half_life="4ba").write_back(every="2ba")
    with pytest.raises(RuntimeError, match=r"write_back is not supported for a DeepSpeed ZeRO-3 model"):
        ema.attach(make_model())
    attached = EMA(half_life="4ba")
    attached.attach(make_model())
    with pytest.raises(RuntimeError, match=r"write_back is not supported for a DeepSpeed ZeRO-3 model"):
        attached.write_back(pull=0.5)


def test_a_corrupt_saved_phase_is_refused_before_anything_changes() -> None:
    ema = EMA(half_life="4ba").write_back(every="2ba")
    model, optimizer = setup(ema)
    run(ema, model, optimizer, range(3))
    state = copy.deepcopy(ema.state_dict())
    state["write_back"]["last"] = "4"
    n = ema.n_averaged
    with pytest.raises(ValueError, match=r"write_back\['last'\] must be an int, got '4'"):
        ema.load_state_dict(state)
    assert ema.n_averaged == n and ema.writeback.last == 3


def test_a_state_without_write_back_loads_and_copies_count_from_there() -> None:
    plain = EMA(half_life="4ba")
    model, optimizer = setup(plain)
    run(plain, model, optimizer, range(3))
    assert "write_back" not in plain.state_dict()
    ema = EMA(half_life="4ba").write_back(every="2ba")
    ema.attach(model)
    ema.load_state_dict(copy.deepcopy(plain.state_dict()))
    run(ema, model, optimizer, range(3, 7))
    assert ema.writeback.num_copies == 1 and ema.writeback.last == 6  # phase from the first step after the load
