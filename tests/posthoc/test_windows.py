"""Uniform windows (SWA after training): the closed-form inner products, and a window reconstructed from a real
run's snapshots against the same window's average tracked directly by SWA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from emakit.averaging import EMA, SWA
from emakit.posthoc.cli import main
from emakit.posthoc.profiles import (
    SIGMA_REL_MAX,
    HalfLifeProfile,
    PowerProfile,
    UniformWindow,
    power_weights,
    profile_inner,
    solve_coefficients,
)
from emakit.posthoc.reconstruction import plan_reconstruction, reconstruct

UPDATES = 200
EVERY = 20
TRACKED = (0.05, 0.10)


def numeric_inner(a: Any, t_a: float, b: Any, t_b: float) -> float:
    """Midpoint rule over a fine grid of tau: an independent check of the closed forms."""
    tau = (np.arange(400_000) + 0.5) * (max(t_a, t_b) / 400_000)

    def density(p: Any, t: float) -> np.ndarray:
        if isinstance(p, UniformWindow):
            return np.where((tau > t - p.length) & (tau <= t), 1 / p.length, 0.0)
        if isinstance(p, PowerProfile):
            return np.where(tau <= t, (p.gamma + 1) * tau**p.gamma / t ** (p.gamma + 1), 0.0)
        return np.where(tau <= t, p.rate * np.exp(-p.rate * (t - tau)), 0.0)

    return float(np.sum(density(a, t_a) * density(b, t_b)) * (tau[1] - tau[0]))


@settings(max_examples=25, deadline=None)
@given(
    length=st.floats(1, 100),
    t_w=st.floats(100, 200),
    other=st.sampled_from(["power", "power0", "half_life", "window"]),
    t_o=st.floats(20, 250),
    shape=st.floats(0.5, 30),
)
def test_window_inner_products_are_the_integral(
    length: float, t_w: float, other: str, t_o: float, shape: float
) -> None:
    window = UniformWindow(length)
    profile = {
        "power": PowerProfile(shape),
        "power0": PowerProfile(0.0),
        "half_life": HalfLifeProfile(shape),
        "window": UniformWindow(min(shape * 3, t_o)),
    }[other]
    expected = numeric_inner(window, t_w, profile, t_o)
    assert profile_inner(window, t_w, profile, t_o) == pytest.approx(expected, rel=2e-3, abs=1e-7)
    assert profile_inner(profile, t_o, window, t_w) == profile_inner(window, t_w, profile, t_o)


def test_the_uniform_profile_is_sigma_rel_max_and_equal_weights() -> None:
    uniform = PowerProfile.from_sigma_rel(SIGMA_REL_MAX)
    assert uniform.gamma == 0.0 and uniform.sigma_rel == pytest.approx(SIGMA_REL_MAX)
    assert [1 - uniform.beta(t) for t in (1, 2, 5)] == pytest.approx([1.0, 0.5, 0.2], rel=1e-15)
    np.testing.assert_allclose(power_weights(7, 0.0), np.full(7, 1 / 7))
    # two uniform snapshots make a window between them exactly
    x = solve_coefficients([(uniform, 160.0), (uniform, 200.0)], UniformWindow(40), 200.0)
    np.testing.assert_allclose(x, [-4.0, 5.0], rtol=1e-9)


def train(folder_without: Path, folder_with: Path, windows: list[tuple[int, int]]) -> dict[str, Any]:
    """A small MLP with BatchNorm, noisy SGD for UPDATES steps; two EMAs snapshot (the EDM2 pair, and the pair
    plus the uniform profile) every EVERY updates; one SWA per window tracks it directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(512, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    without = EMA(sigma_rel=list(TRACKED), snapshot_interval=f"{EVERY}ba", snapshot_folder=folder_without)
    with_uniform = EMA(sigma_rel=[*TRACKED, SIGMA_REL_MAX], snapshot_interval=f"{EVERY}ba", snapshot_folder=folder_with)
    direct = [SWA(swa_start=f"{t0 + 1}ba", swa_end=f"{t1}ba", update_interval="1ba") for t0, t1 in windows]
    averagers = [without, with_uniform, *direct]
    for averager in averagers:
        averager.attach(model)
    for _ in range(UPDATES):
        batch = torch.randint(0, len(x), (16,))
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for averager in averagers:
            averager.step()
    assert all(s.window_closed for s in direct)
    ends = [without._averages.storages[j].state_dict() for j in range(2)]  # type: ignore[index]
    return {
        "direct": [{n: t.clone() for n, t in s.ema_tensors.items()} for s in direct],
        "ema_gap": distance(ends[0], ends[1]),
    }


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = [n for n in a if a[n].is_floating_point()]
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in names) ** 0.5)


def test_a_window_reconstructed_from_a_real_run(tmp_path: Path) -> None:
    windows = [(160, 200), (100, 180), (150, 200)]  # at snapshots (last 20%; inside the run), and not
    run = train(tmp_path / "without", tmp_path / "with", windows)
    rows = []
    for (t0, t1), direct in zip(windows, run["direct"], strict=True):
        for folder in ("without", "with"):
            plan = plan_reconstruction(tmp_path / folder, window=(t0, t1))
            assert plan.t == t1 and plan.target == UniformWindow(t1 - t0)
            result = reconstruct(tmp_path / folder, window=(t0, t1))
            rows.append((t0, t1, folder, plan.fit_error, distance(result, direct) / run["ema_gap"]))
    print("\nwindow      snapshots        profile fit error   tensor error / EMA gap")
    for t0, t1, folder, fit, error in rows:
        print(f"({t0:>3},{t1:>3})  {folder:<15}  {fit:>17.3e}   {error:>12.3e}")
    by = {(r[0], r[2]): r for r in rows}
    for t0, _ in windows:
        assert by[(t0, "with")][3] < by[(t0, "without")][3]  # the uniform profile makes every window fit better
    for t0 in (160, 100):  # both ends at snapshots: exact with the uniform profile
        assert by[(t0, "with")][3] < 1e-6
        assert by[(t0, "with")][4] <= 0.01
    assert by[(160, "without")][3] > 0.05  # the EDM2 pair alone represents a window poorly, and says so


def test_a_window_as_a_fraction_is_the_last_updates(tmp_path: Path) -> None:
    run = train(tmp_path / "without", tmp_path / "with", [(160, 200)])
    result = reconstruct(tmp_path / "with", window=0.2)
    assert distance(result, run["direct"][0]) / run["ema_gap"] <= 0.01
    assert plan_reconstruction(tmp_path / "with", window=0.2, t=100).target == UniformWindow(20)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0.0}, r"window must be a fraction in \(0, 1\] or a \(t0, t1\) pair"),
        ({"window": 1.5}, r"window must be a fraction in \(0, 1\]"),
        ({"window": (50, 20)}, r"window \(t0, t1\) needs 0 <= t0 < t1 \(EMA updates\), got \(50, 20\)"),
        ({"window": (10, 20), "t": 30}, r"window=\(10, 20\) ends at t=20; t=30 must be left out or equal it"),
        ({"window": (10, 20.5)}, r"window must be a fraction in \(0, 1\] or a \(t0, t1\) pair"),
        (
            {"window": 0.2, "sigma_rel": 0.1},
            r"give exactly one of sigma_rel, half_life, window and kernel \(the target average\)",
        ),
        ({"window": (10, 500)}, r"t=500 is after the last snapshot"),
    ],
)
def test_bad_windows_name_the_argument(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    folder = tmp_path / "snapshots"
    model = nn.Linear(2, 2)
    ema = EMA(sigma_rel=[0.1, SIGMA_REL_MAX], snapshot_interval="10ba", snapshot_folder=folder)
    ema.attach(model)
    for _ in range(40):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.step()
    with pytest.raises(ValueError, match=message):
        plan_reconstruction(folder, **kwargs)


def test_the_cli_reconstructs_a_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = train(tmp_path / "without", tmp_path / "with", [(160, 200)])
    out = tmp_path / "swa.safetensors"
    assert main([str(tmp_path / "with"), "--window", "160:200", "--out", str(out)]) == 0
    assert "reconstructed window(last 40 updates) at t=200" in capsys.readouterr().out
    assert distance(load_file(out), run["direct"][0]) / run["ema_gap"] <= 0.01
    assert main([str(tmp_path / "without"), "--window", "0.2", "--out", str(tmp_path / "swa2.safetensors")]) == 0
    assert "warning: the snapshots represent this target poorly" in capsys.readouterr().err
    assert main([str(tmp_path / "with"), "--window", "20:10", "--out", str(out)]) == 2
    assert "--window: must be a fraction in (0, 1] or T0:T1 with 0 <= T0 < T1, got '20:10'" in capsys.readouterr().err


@given(t0=st.integers(0, 10**9), length=st.integers(1, 10**9), fraction=st.floats(1e-6, 1.0))
def test_window_option_reads_pairs_and_fractions(t0: int, length: int, fraction: float) -> None:
    from emakit.posthoc.cli import build_parser

    parser = build_parser()
    pair = parser.parse_args(["s", "--window", f"{t0}:{t0 + length}", "--out", "x.safetensors"]).window
    assert pair == (t0, t0 + length)
    assert parser.parse_args(["s", "--window", repr(fraction), "--out", "x.safetensors"]).window == fraction


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1", "nan", "5:5", "7:3", "-1:4", "a:b", "1:2:3", "0.2:4", ""])
def test_window_option_refuses(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["s", f"--window={bad}", "--out", "x.safetensors"]) == 2
    assert f"--window: must be a fraction in (0, 1] or T0:T1 with 0 <= T0 < T1, got {bad!r}" in capsys.readouterr().err
