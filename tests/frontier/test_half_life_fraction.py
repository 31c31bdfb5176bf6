"""A half-life that is a fraction of the updates so far: torchtitan's rule, against a float64 oracle, its closed
form, and the power profile it approaches."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _oracle import ema_oracle, max_error, torchtitan_decay, train
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit import EMA
from emakit.averaging.schedules import GrowingHalfLife
from emakit.posthoc.profiles import PowerProfile, power_weights


def test_the_average_follows_the_float64_oracle_in_a_hand_loop() -> None:
    ema = EMA(half_life_fraction=[0.1, 0.3])
    _, recorded = train(ema, 40)
    for j, f in enumerate([0.1, 0.3]):
        ema.eval_average = j
        expected = ema_oracle(recorded, lambda n, f=f: 1 - torchtitan_decay(f, n))
        error = max_error(ema.ema_tensors, expected)
        print(f"half_life_fraction={f}: max |ema - oracle| = {error:.2e}")
        assert error < 2e-6


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-3, 5.0), st.integers(1, 10**7))
def test_each_update_weight_is_torchtitans_and_the_half_life_is_the_fraction(f: float, n: int) -> None:
    schedule = GrowingHalfLife((f,), EMA().schedule.update_interval, EMA().schedule.start)
    (weight,) = schedule.weights(n)
    assert weight == pytest.approx(1.0 - torchtitan_decay(f, n), rel=1e-9, abs=1e-15)
    if 0 < weight < 0.5:  # the half-life in updates, where the weight is well conditioned
        assert -math.log(2.0) / math.log1p(-weight) == pytest.approx(f * n, rel=1e-9)


@pytest.mark.parametrize("f", [0.02, 0.05, 0.1, 0.3, math.log(2.0)])
def test_it_is_the_power_profile_gamma_ln2_over_f_minus_1_where_they_coincide(f: float) -> None:
    schedule = EMA(half_life_fraction=f).schedule
    assert isinstance(schedule, GrowingHalfLife)
    (gamma,) = schedule.power_gammas
    assert gamma == pytest.approx(math.log(2.0) / f - 1.0)
    power = PowerProfile(gamma)
    # per update: the weights agree to first order in 1/n (the closed forms' expansions)
    for n in (100, 1000, 10_000):
        ratio = schedule.weights(n)[0] / (1.0 - power.beta(n))
        assert abs(ratio - 1.0) < (gamma + 2.0) / n
    # over a run: the weight each update ends with, against the power profile's closed form (float64)
    total = 20_000
    betas = np.array([0.0] + [1.0 - schedule.weights(n)[0] for n in range(2, total + 1)])  # n = 1: the start copy
    after = np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])  # product of the later betas
    grown = (1.0 - betas) * after
    expected = power_weights(total, gamma)
    late = slice(total // 10, None)  # past the first tenth of training, where 1/k is small
    assert np.abs(grown[late] - expected[late]).sum() < 0.01 * expected[late].sum()
    assert grown.sum() == pytest.approx(1.0)


def test_resume_mid_run_is_bitwise() -> None:
    ema = EMA(half_life_fraction=0.2)
    model, _ = train(ema, 7)
    saved, saved_model = copy.deepcopy(ema.state_dict()), copy.deepcopy(model)
    train(ema, 8, model=model, start=7)
    resumed = EMA(half_life_fraction=0.2)
    resumed.attach(saved_model)
    resumed.load_state_dict(saved)
    train(resumed, 8, model=saved_model, start=7)
    assert resumed.n_averaged == ema.n_averaged == 15
    for name, tensor in ema.ema_tensors.items():
        assert torch.equal(tensor, resumed.ema_tensors[name]), name


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"half_life_fraction": 0.0},
            ValueError,
            r"half_life_fraction must be a finite number greater than 0, got 0\.0",
        ),
        ({"half_life_fraction": -1}, ValueError, r"half_life_fraction must be .* got -1"),
        ({"half_life_fraction": math.nan}, ValueError, r"half_life_fraction must be .* got nan"),
        ({"half_life_fraction": True}, ValueError, r"half_life_fraction must be .* got True"),
        ({"half_life_fraction": []}, ValueError, r"half_life_fraction must be a number or a non-empty list"),
        ({"half_life_fraction": [0.1, 0.1]}, ValueError, r"half_life_fraction: every average needs its own value"),
        (
            {"half_life_fraction": 0.1, "half_life": "10ba"},
            ValueError,
            r"exactly one of half_life, smoothing, sigma_rel and half_life_fraction, got half_life='10ba', "
            r"half_life_fraction=0\.1",
        ),
        ({"half_life_fraction": 0.1, "warmup": True}, ValueError, r"half_life_fraction has its own ramp"),
        (
            {"half_life_fraction": 0.1, "snapshot_folder": "x", "snapshot_interval": "1ba"},
            ValueError,
            r"snapshot_folder: post-hoc reconstruction needs averages of a known profile",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EMA(**kwargs)


def test_the_posthoc_page_quotes_the_power_profile_of_each_fraction() -> None:
    page = (Path(__file__).parents[2] / "docs" / "posthoc.md").read_text()
    rows = re.findall(r"^\| (0\.\d+) \| ([\d.]+) \| ([\d.]+) \|$", page, flags=re.MULTILINE)
    assert len(rows) == 4
    for f, gamma, sigma_rel in rows:
        (expected,) = EMA(half_life_fraction=float(f)).schedule.power_gammas  # type: ignore[attr-defined]
        assert gamma == f"{expected:.2f}"
        assert sigma_rel == f"{PowerProfile(expected).sigma_rel:.4f}"
