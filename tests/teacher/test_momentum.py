"""Teacher momentum schedules against a float64 oracle, update by update; their length, resume and refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_map

from emakit import EMA
from emakit.averaging import CosineMomentum, MomentumFunction, batch_statistics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _teacher_worker import RESUME_AT, STEPS, clone, cosine_oracle, full_weights, make_run, train


def oracle_run(ema: EMA, steps: int, momenta: list[float], **attach: Any) -> tuple[int, float]:
    """Train a small model with SGD; after each update compare the average with a float64 oracle blending the
    recorded weights with ``momenta[i]`` at blend ``i``. Returns (blends, worst |diff|)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    ema.attach(model, **attach)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    oracle: dict[str, torch.Tensor] | None = None
    blends, worst = 0, 0.0
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if not ema.step():
            continue
        weights = {n: p.detach().double() for n, p in model.named_parameters()}
        if oracle is None:
            oracle = {n: w.clone() for n, w in weights.items()}
        else:
            m = momenta[blends]
            oracle = {n: m * oracle[n] + (1 - m) * weights[n] for n in oracle}
            blends += 1
        for name, expected in oracle.items():
            got = ema.ema_tensors[name].double()
            worst = max(worst, (got - expected).abs().max().item())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    return blends, worst


def test_cosine_ramp_against_float64_oracle() -> None:
    total = 12
    momenta = [cosine_oracle(i, 0.5, 1.0, total) for i in range(total + 5)]
    ema = EMA(schedule=CosineMomentum(base=0.5, final=1.0))
    blends, worst = oracle_run(ema, total + 5, momenta, max_duration=f"{total}ba")
    assert blends == total + 4  # the start copy, then one blend per step; from blend 12 on the momentum is 1
    print(f"CosineMomentum vs float64 oracle over {blends} blends: max |diff| {worst:.2e}")


def test_cosine_ramp_length_in_epochs_with_update_interval() -> None:
    """'3ep' of 4 batches with update_interval '2ba': 6 updates in the ramp."""
    momenta = [cosine_oracle(i, 0.9, 0.99, 6) for i in range(12)]
    ema = EMA(schedule=CosineMomentum(base=0.9, final=0.99, update_interval="2ba"))
    blends, _ = oracle_run(ema, 12, momenta, max_duration="3ep", batches_per_epoch=4)
    assert blends == 6  # the start copy at step 1, then a blend at every even step
    assert ema.schedule.learned_updates == 6  # type: ignore[attr-defined]


def test_total_updates_given_wins_over_the_length() -> None:
    momenta = [cosine_oracle(i, 0.6, 1.0, 4) for i in range(10)]
    ema = EMA(schedule=CosineMomentum(base=0.6, total_updates=4))
    blends, _ = oracle_run(ema, 10, momenta, max_duration="100ba")
    assert blends == 9


def test_momentum_function_against_float64_oracle() -> None:
    table = [0.5, 0.7, 0.9, 0.25, 0.0, 1.0, 0.99]
    ema = EMA(schedule=MomentumFunction(table.__getitem__))
    blends, worst = oracle_run(ema, 8, table)
    assert blends == 7
    print(f"MomentumFunction vs float64 oracle: max |diff| {worst:.2e}")


@given(
    base=st.floats(0.0, 1.0),
    final=st.floats(0.0, 1.0),
    total=st.integers(1, 10_000),
    n=st.integers(2, 20_000),
)
def test_cosine_weights_are_one_minus_dino_momentum(base: float, final: float, total: int, n: int) -> None:
    weight = CosineMomentum(base=base, final=final, total_updates=total).weights(n)
    assert weight == pytest.approx([1 - cosine_oracle(n - 2, base, final, total)], abs=1e-12)
    assert 0.0 <= weight[0] <= 1.0


def test_refusals() -> None:
    ema = EMA(schedule=CosineMomentum())
    ema.attach(nn.Linear(2, 2))
    ema.step()  # the start copy needs no momentum
    with pytest.raises(ValueError, match="CosineMomentum ramps over the training length"):
        ema.step()
    with pytest.raises(ValueError, match=r"excludes half_life='10ba'"):
        EMA(schedule=CosineMomentum(), half_life="10ba")
    with pytest.raises(ValueError, match=r"excludes .*update_interval='2ba'"):
        EMA(schedule=CosineMomentum(), update_interval="2ba")
    with pytest.raises(TypeError, match="schedule must be an emakit Schedule"):
        EMA(schedule=0.996)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"base must be a momentum in \[0, 1\], got 1.5"):
        CosineMomentum(base=1.5)
    with pytest.raises(ValueError, match="total_updates must be a positive int or None, got 0"):
        CosineMomentum(total_updates=0)
    with pytest.raises(ValueError, match=r"update_interval must be greater than 0, got '0ba'"):
        CosineMomentum(update_interval="0ba")
    with pytest.raises(TypeError, match="fn must be a callable"):
        MomentumFunction(0.9)  # type: ignore[arg-type]
    bad = EMA(schedule=MomentumFunction(lambda i: 2.0))
    bad.attach(nn.Linear(2, 2))
    bad.step()
    with pytest.raises(ValueError, match=r"fn\(0\) must be a momentum in \[0, 1\], got 2.0"):
        bad.step()


def test_samples_length_refused_until_told_in_batches() -> None:
    ema = EMA(schedule=CosineMomentum())
    ema.attach(nn.Linear(2, 2), max_duration="64sp")
    ema.step(num_samples=8)
    with pytest.raises(ValueError, match="CosineMomentum ramps over the training length"):
        ema.step(num_samples=8)


@pytest.mark.parametrize("through_file", [False, True])
def test_resume_mid_run_with_the_teacher_in_the_loss_is_bitwise(tmp_path: Path, through_file: bool) -> None:
    model, optimizer, ema = make_run(sharded=False)
    whole = train(model, optimizer, ema, range(STEPS))
    expected = full_weights(model)

    model, optimizer, ema = make_run(sharded=False)
    first = train(model, optimizer, ema, range(RESUME_AT))
    states = tree_map(clone, (model.state_dict(), optimizer.state_dict(), ema.state_dict()))
    if through_file:
        torch.save(states, tmp_path / "state.pt")
        states = torch.load(tmp_path / "state.pt", weights_only=True)
    model, optimizer, ema = make_run(sharded=False)
    model.load_state_dict(states[0])
    optimizer.load_state_dict(states[1])
    ema.load_state_dict(states[2])
    second = train(model, optimizer, ema, range(RESUME_AT, STEPS))
    probes = {**first["probe"], **second["probe"]}
    assert all(torch.equal(probes[s], whole["probe"][s]) for s in range(STEPS))
    assert all(torch.equal(w, expected[n]) for n, w in full_weights(model).items())


def test_plain_teacher_is_the_average_without_gradients() -> None:
    model, optimizer, ema = make_run(sharded=False)
    train(model, optimizer, ema, range(2))
    teacher = ema.ema_model
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None
        if name != "frozen":
            assert p.data_ptr() == ema.ema_tensors[name].data_ptr()
    assert teacher.frozen is model.frozen  # not averaged: shared with the student


def test_batch_statistics_teacher_leaves_running_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    ema = EMA(half_life="2ba")
    ema.attach(model)
    model(torch.randn(8, 3))
    ema.step()
    teacher = ema.ema_model
    before = {n: b.clone() for n, b in teacher.named_buffers()}
    x = torch.randn(6, 3) * 3 + 1
    with batch_statistics(teacher):
        out = teacher(x)
    h = teacher[0](x)
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + teacher[1].eps)
    torch.testing.assert_close(out, expected * teacher[1].weight + teacher[1].bias)
    assert all(torch.equal(b, before[n]) for n, b in teacher.named_buffers())
    assert not teacher.training and not teacher[1].training
    torch.testing.assert_close(teacher(x), teacher[1](h))  # eval mode with the running statistics again
    with pytest.raises(RuntimeError, match="inside"), batch_statistics(teacher):
        raise RuntimeError("inside")
    assert teacher[1].running_mean is not None and teacher[1].running_var is not None
