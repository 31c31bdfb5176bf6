"""Any kernel as a post-hoc target: each named kernel rebuilt from a real run's snapshots against a float64 oracle
(the kernel-weighted average of the weights recorded after every update), the reported fit error against the true
one, WSM's decay emulation on a noisy quadratic, the ``NAME:VALUE`` parser, and the refusals."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _runs import noisy_mlp
from _runs import probe as probe_run
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emakit import EMA
from emakit.posthoc.profiles import SIGMA_REL_MAX, PowerProfile
from emakit.posthoc.reconstruction import plan_reconstruction, reconstruct
from emakit.posthoc.targets import KERNELS, Kernel, RawTarget, decay_kernel, kernel_from_function, parse_kernel

UPDATES = 240
EVERY = 12  # 20 snapshots
TRACKED = (0.05, 0.10, SIGMA_REL_MAX)
NAMED = ["cosine:0.2", "cosine:0.1", "linear:0.25", "1-sqrt:0.3", "power:0.07", "ema:12", "uniform:0.2"]


# ---------------------------------------------------------------------------------------------- the oracle
def oracle_weights(spec: str, t: int) -> np.ndarray:
    """The weight of each update 1..t, from the kernel's definition (not from emakit): for a decay, the drop of the
    learning-rate multiplier over the update; for the profiles, their averages run in float64 over unit impulses."""
    name, value = spec.split(":")
    v = float(value)
    k = np.arange(1, t + 1, dtype=np.float64)
    if name in ("cosine", "linear", "1-sqrt"):

        def lr(u: np.ndarray) -> np.ndarray:
            s = np.clip((u - (1 - v)) / v, 0, 1)
            return {"cosine": (1 + np.cos(np.pi * s)) / 2, "linear": 1 - s, "1-sqrt": 1 - np.sqrt(s)}[name]

        return lr((k - 1) / t) - lr(k / t)
    if name == "uniform":
        n = round(v * t)
        return np.where(k > t - n, 1.0 / n, 0.0)
    weights = np.zeros(t)  # the EMA recursion, each update's weight tracked exactly
    for step in range(1, t + 1):
        if name == "power":
            beta = (1 - 1 / step) ** (PowerProfile.from_sigma_rel(v).gamma + 1)
        else:
            beta = 0.0 if step == 1 else 0.5 ** (1 / v)
        weights *= beta
        weights[step - 1] += 1 - beta
    return weights


def weighted_average(recorded: list[dict[str, torch.Tensor]], w: np.ndarray) -> dict[str, torch.Tensor]:
    return {n: sum(float(c) * r[n].double() for c, r in zip(w, recorded, strict=True)) for n in recorded[0]}  # type: ignore[misc]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in b) ** 0.5)


def record_run(model: nn.Module, folder: Path, step: Any) -> list[dict[str, torch.Tensor]]:
    """Run ``step(update)`` UPDATES times with an EMA snapshotting TRACKED every EVERY updates; record the weights
    after every update (float64)."""
    ema = EMA(sigma_rel=list(TRACKED), snapshot_interval=f"{EVERY}ba", snapshot_folder=folder)
    ema.attach(model)
    recorded = []
    for k in range(1, UPDATES + 1):
        step(k)
        ema.step()
        recorded.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return recorded


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A model of one parameter that holds e_k after update k: its average is the weight each update was given."""
    folder = tmp_path_factory.mktemp("probe")
    model, step = probe_run(UPDATES)
    return folder, record_run(model, folder, step)


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A tiny MLP trained by noisy SGD."""
    folder = tmp_path_factory.mktemp("training")
    model, step = noisy_mlp()
    return folder, record_run(model, folder, step)


FLOAT32 = 1e-6  # the snapshots hold float32: a floor under any measured error


@pytest.mark.parametrize("spec", NAMED)
def test_the_reported_fit_error_is_the_true_error_of_the_weights_given_to_each_update(
    spec: str, probe: tuple[Path, list[dict[str, torch.Tensor]]]
) -> None:
    folder, recorded = probe
    w = oracle_weights(spec, UPDATES)
    expected = weighted_average(recorded, w)["w"]  # = w: the probe's weights are the unit vectors
    plan = plan_reconstruction(folder, kernel=spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a poor fit warns; measured here
        got = reconstruct(folder, kernel=spec)["w"].double()
    true = float((got - expected).norm() / expected.norm())
    print(f"\n{spec:<12} reported fit error {plan.fit_error:.3e}   true error of the per-update weights {true:.3e}")
    assert true <= 2 * plan.fit_error + FLOAT32
    assert plan.fit_error <= 2 * true + FLOAT32


@pytest.mark.parametrize("spec", NAMED)
def test_a_kernel_rebuilt_from_a_training_run_is_the_oracle_within_its_fit_error(
    spec: str, training: tuple[Path, list[dict[str, torch.Tensor]]]
) -> None:
    """``rebuilt - oracle = sum_k d_k theta_k`` with ``sum_k d_k = 0`` and ``||d|| <= fit error x ||w||``, so by
    Cauchy-Schwarz ``||rebuilt - oracle|| <= fit error x ||w|| x sqrt(sum_k ||theta_k - mean||^2)``."""
    folder, recorded = training
    w = oracle_weights(spec, UPDATES)
    expected = weighted_average(recorded, w)
    mean = weighted_average(recorded, np.full(UPDATES, 1 / UPDATES))
    spread = math.sqrt(sum(distance(r, mean) ** 2 for r in recorded))
    plan = plan_reconstruction(folder, kernel=spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = reconstruct(folder, kernel=spec)
    error = distance(got, expected)
    bound = plan.fit_error * float(np.linalg.norm(w)) * spread
    print(f"\n{spec:<12} |rebuilt - oracle| {error:.3e}  bound from the fit error {bound:.3e}")
    assert error <= bound + FLOAT32 * distance(expected, {n: torch.zeros_like(v) for n, v in expected.items()})


def test_a_python_function_is_a_kernel(probe: tuple[Path, list[dict[str, torch.Tensor]]]) -> None:
    folder, _ = probe
    plan = plan_reconstruction(folder, kernel=lambda k, t: np.exp((k - t) / 15.0))
    w = np.exp((np.arange(1, UPDATES + 1) - UPDATES) / 15.0)
    w /= w.sum()
    got = reconstruct(folder, kernel=lambda k, t: np.exp((k - t) / 15.0))["w"].double().numpy()
    true = np.linalg.norm(got - w) / np.linalg.norm(w)
    assert true <= 2 * plan.fit_error + FLOAT32 and plan.fit_error <= 2 * true + FLOAT32
    assert plan.fit_error < 0.01


def test_the_profile_kernels_are_the_profile_targets(probe: tuple[Path, list[dict[str, torch.Tensor]]]) -> None:
    folder, _ = probe
    for spec, kwargs in [
        ("power:0.07", {"sigma_rel": 0.07}),
        ("ema:12", {"half_life": 12}),
        ("uniform:0.2", {"window": 0.2}),
    ]:
        assert plan_reconstruction(folder, kernel=spec) == plan_reconstruction(folder, **kwargs)


# ---------------------------------------------------------------------------------------------- WSM on a quadratic
@pytest.mark.parametrize("shape", ["cosine", "linear", "1-sqrt"])
def test_a_decay_kernel_lands_nearer_the_decayed_run_than_the_constant_rate_endpoint(
    tmp_path: Path, shape: str
) -> None:
    """SGD on L = sum_i h_i (theta_i - c_i)**2 / 2 with gradient noise s, from theta_0 = c (the noise regime).
    With the same noise, the run whose rate is scaled by a decay over the last 20% ends at
    theta_0 - lr sum_k a_k g_k; the constant-rate run's average with the decay's merge weights reaches the same point
    up to terms in lr h (the decay window is 0.2 x 400 = 80 updates, lr h <= 0.002: lr h x 80 <= 0.16), while the
    constant-rate endpoint misses it by lr s sqrt(sum_k (1 - a_k)**2) per coordinate. Over 64 coordinates the
    comparison holds for every seed, by a wide margin."""
    dim, lr, noise, fraction = 64, 0.05, 1.0, 0.2
    a = decay_kernel(shape, fraction)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        h = torch.linspace(0.005, 0.04, dim, dtype=torch.float64)
        centre = torch.randn(dim, generator=g, dtype=torch.float64)
        xi = torch.randn(400, dim, generator=g, dtype=torch.float64)
        multiplier = 1 - np.cumsum(np.concatenate([[0.0], a.masses(400)]))[:-1]  # a((k-1)/T) = 1 - sum_{j<k} w_j
        model = nn.Module()
        model.theta = nn.Parameter(centre.float().clone())
        folder = tmp_path / f"seed{seed}"
        ema = EMA(sigma_rel=list(TRACKED), snapshot_interval="20ba", snapshot_folder=folder)
        ema.attach(model)
        constant, decayed = centre.clone(), centre.clone()
        for k in range(400):
            constant -= lr * (h * (constant - centre) + noise * xi[k])
            decayed -= lr * multiplier[k] * (h * (decayed - centre) + noise * xi[k])
            with torch.no_grad():
                model.theta.copy_(constant)
            ema.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 1-sqrt's fit is poor (29%), and says so
            merged = reconstruct(folder, kernel=a)["theta"].double()
        to_merged, to_endpoint = float((merged - decayed).norm()), float((constant - decayed).norm())
        print(
            f"\n{shape} seed {seed}: |merged - decayed| {to_merged:.4f}   |constant endpoint - decayed| {to_endpoint:.4f}"
        )
        assert to_merged < 0.5 * to_endpoint


# ---------------------------------------------------------------------------------------------- the parser
_VALID = {
    "cosine": st.floats(1e-6, 1.0),
    "linear": st.floats(1e-6, 1.0),
    "1-sqrt": st.floats(1e-6, 1.0),
    "power": st.floats(1e-4, SIGMA_REL_MAX),
    "ema": st.floats(1e-3, 1e9),
    "uniform": st.floats(1e-6, 1.0),
    "bema": st.tuples(*[st.floats(0.0, 1e6)] * 4),
    "raw": st.just(None),
}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(KERNELS)))
def test_parse_kernel_reads_every_named_kernel(data: st.DataObject, name: str) -> None:
    value = data.draw(_VALID[name])
    if name in ("bema", "raw"):
        text = name if value is None else f"bema:{','.join(map(repr, value))}"
        target = parse_kernel(text)["kernel"]
        assert isinstance(target, RawTarget) and target.name == name and target.params == (value or ())
        assert parse_kernel(str(target))["kernel"] == target  # str() is the spec back
        return
    parsed = parse_kernel(f"{name}:{value!r}")
    if name in ("cosine", "linear", "1-sqrt"):
        kernel = parsed["kernel"]
        assert isinstance(kernel, Kernel) and kernel.name == name and kernel.params == (value,)
        assert parse_kernel(str(kernel))["kernel"].params == kernel.params  # str() is the spec back
        w = kernel.masses(97)
        assert w.shape == (97,) and np.all(w >= 0) and math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    else:
        assert parsed == {{"power": "sigma_rel", "ema": "half_life", "uniform": "window"}[name]: value}


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=20))
def test_parse_kernel_refuses_anything_else_by_value_error(text: str) -> None:
    try:
        parse_kernel(text)
    except ValueError as e:
        assert repr(text) in str(e)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "cosine",
            r"kernel must be NAME:VALUE with NAME one of cosine:F; linear:F; 1-sqrt:F; power:S; ema:H; uniform:F",
        ),
        ("wsd:0.2", r"NAME one of cosine:F.*got 'wsd:0.2'"),
        (
            "cosine:0",
            r"kernel cosine: WSM merge emulating a cosine .* over the last fraction F in \(0, 1\]; got 'cosine:0'",
        ),
        ("cosine:1.5", r"got 'cosine:1.5'"),
        ("cosine:nan", r"kernel cosine: F must be a number"),
        ("cosine:x", r"kernel cosine: F must be a number"),
        ("power:0.3", r"kernel power: the power profile of width sigma_rel S in \(0, 1/sqrt\(12\) = 0.2887\]"),
        ("ema:-4", r"kernel ema: a classic EMA with a half-life of H > 0 updates"),
        ("uniform:2", r"kernel uniform: .*got 'uniform:2'"),
    ],
)
def test_parse_kernel_names_what_it_accepts(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_kernel(text)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (lambda k, t: -k, r"kernel bad: weights must be finite and >= 0, got -1.0 for update 1 \(t=240\)"),
        (lambda k, t: np.where(k == 3, np.nan, 1.0), r"got nan for update 3"),
        (lambda k, t: 0 * k, r"kernel bad: weights all 0 over updates 1..240: nothing to average"),
        (lambda k, t: np.ones(5), r"kernel bad: must return one weight per update \(t=240 of them\)"),
    ],
)
def test_a_bad_kernel_function_is_refused(
    function: Any, message: str, probe: tuple[Path, list[dict[str, torch.Tensor]]]
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_reconstruction(probe[0], kernel=kernel_from_function(function, "bad"))
    with pytest.raises(
        TypeError, match=r"kernel must be a name \('cosine:0.2'\), a Kernel or a function f\(k, t\), got 3"
    ):
        plan_reconstruction(probe[0], kernel=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"give exactly one of sigma_rel, half_life, window and kernel"):
        plan_reconstruction(probe[0], kernel="cosine:0.2", sigma_rel=0.1)


def test_a_kernel_no_snapshot_covers_is_refused(probe: tuple[Path, list[dict[str, torch.Tensor]]]) -> None:
    # At t=130 the latest snapshot is at 120: the last 5% of 130 updates (124..130) are in none of them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no numpy RuntimeWarning on the way
        with pytest.raises(
            ValueError, match=r"cannot represent linear:0.05 at t=130: the latest one at or before t \(t=120\)"
        ):
            plan_reconstruction(probe[0], kernel="linear:0.05", t=130)


def percent(error: float) -> str:
    return "exact" if error < 1e-6 else f"{100 * error:.2g}%"


def kernel_table(tmp_path: Path) -> list[str]:
    """docs/posthoc.md's table: the fit error of each named kernel at t=240, snapshots every 12, of two tracked sets."""
    errors: dict[str, list[float]] = {}
    for i, tracked in enumerate(([0.05, 0.10], list(TRACKED))):
        model = nn.Module()
        model.w = nn.Parameter(torch.zeros(2))
        ema = EMA(sigma_rel=tracked, snapshot_interval=f"{EVERY}ba", snapshot_folder=tmp_path / str(i))
        ema.attach(model)
        for _ in range(UPDATES):
            ema.step()
        for spec in NAMED:
            errors.setdefault(spec, []).append(plan_reconstruction(tmp_path / str(i), kernel=spec).fit_error)
    return [f"| `{spec}` | {percent(a)} | {percent(b)} |" for spec, (a, b) in errors.items()]


def test_the_page_quotes_the_fit_error_of_each_kernel(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "posthoc.md").read_text()
    table = kernel_table(tmp_path)
    print("\n" + "\n".join(table))
    assert [line for line in table if line not in page] == []


# ---------------------------------------------------------------------------------------------- the maths
@settings(max_examples=60, deadline=None)
@given(
    t_i=st.integers(1, 300),
    sigma_rel=st.floats(0.02, SIGMA_REL_MAX),
    half_life=st.floats(0.5, 200),
)
def test_update_weights_are_what_the_tracked_averages_give(t_i: int, sigma_rel: float, half_life: float) -> None:
    """Against the averages' recursions run over unit impulses (the tracked EMA's own update rule)."""
    from emakit.posthoc.profiles import HalfLifeProfile
    from emakit.posthoc.targets import update_weights

    k = np.arange(1, t_i + 6, dtype=np.float64)  # and 5 updates after t_i, which it has not seen
    for profile in (PowerProfile.from_sigma_rel(sigma_rel), HalfLifeProfile(half_life)):
        weights = np.zeros(t_i)
        for step in range(1, t_i + 1):
            beta = profile.beta(step)
            weights *= beta
            weights[step - 1] += 1 - beta
        got = update_weights(profile, float(t_i), k)
        np.testing.assert_allclose(got[:t_i], weights, rtol=1e-9, atol=1e-15)
        assert not got[t_i:].any()


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(20, 150),
    every=st.integers(3, 20),
    raw=st.lists(st.floats(0, 1), min_size=1, max_size=8),
    sigma_rels=st.sets(st.sampled_from([0.03, 0.05, 0.1, 0.2, SIGMA_REL_MAX]), min_size=1, max_size=3),
)
def test_kernel_fit_reports_the_residual_of_the_weights_it_chose(
    t: int, every: int, raw: list[float], sigma_rels: set[float]
) -> None:
    """The fit error is ||sum_i x_i m_i - w|| / ||w|| computed by brute force over the updates; x sums to 1, is 0
    after t, and no other combination of the same snapshots does better (the least-squares optimum, then scaled)."""
    from emakit.posthoc.targets import kernel_fit, update_weights

    times = [float(s) for s in range(every, t + every, every)]
    sources = [(PowerProfile.from_sigma_rel(s), ti) for ti in times for s in sorted(sigma_rels)]
    pattern = np.resize(np.asarray(raw), t)
    if not pattern[-every:].any():
        pattern[-1] = 1.0  # weight in the last snapshot interval, so the target is not trivially after t
    kernel = kernel_from_function(lambda k, _t: pattern[: len(k)], "pattern")
    try:
        x, error = kernel_fit(sources, kernel, t)
    except ValueError as e:
        assert "cannot represent pattern" in str(e)
        return
    k = np.arange(1, t + 1, dtype=np.float64)
    m = np.stack([update_weights(p, ti, k) for p, ti in sources])
    w = pattern / pattern.sum()
    assert math.isclose(x.sum(), 1.0, rel_tol=1e-9)
    assert not x[[i for i, (_, ti) in enumerate(sources) if ti > t]].any()
    brute = float(np.linalg.norm(x @ m - w) / np.linalg.norm(w))
    assert error == pytest.approx(brute, rel=1e-5, abs=1e-7)
