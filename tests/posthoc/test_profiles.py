"""The profile maths against independent references: closed forms, a naive update loop, numerical integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit.posthoc.profiles import (
    SIGMA_REL_MAX,
    HalfLifeProfile,
    PowerProfile,
    exponential_inner,
    fit_error,
    gamma_to_sigma_rel,
    power_beta,
    power_exponential_inner,
    power_inner,
    power_weights,
    profile_from_dict,
    profile_inner,
    sigma_rel_to_gamma,
    solve_coefficients,
)

sigma_rels = st.floats(min_value=1e-3, max_value=0.28)
gammas = st.floats(min_value=0.05, max_value=200.0)


# ---------------------------------------------------------------------------------------------- references
def power_density(gamma: float, t: float, tau: np.ndarray) -> np.ndarray:
    return np.where(tau <= t, (gamma + 1) * np.maximum(tau, 0.0) ** gamma / t ** (gamma + 1), 0.0)


def exp_density(half_life: float, t: float, tau: np.ndarray) -> np.ndarray:
    c = math.log(2) / half_life
    return np.where(tau <= t, c * np.exp(-c * (t - tau)), 0.0)


def density(profile: object, t: float, tau: np.ndarray) -> np.ndarray:
    if isinstance(profile, HalfLifeProfile):
        return exp_density(profile.half_life, t, tau)
    assert isinstance(profile, PowerProfile)
    return power_density(profile.gamma, t, tau)


def integrate(f: np.ndarray, tau: np.ndarray) -> float:
    """Composite trapezoid rule (the grids below put points on every profile's end)."""
    return float(np.sum((f[1:] + f[:-1]) * np.diff(tau)) / 2)


def grid(*ends: float, points: int = 200_001) -> np.ndarray:
    """Uniform on [0, each end], plus points graded towards 0 where tau**g (g < 1) is not smooth."""
    parts = [np.linspace(0.0, e, points) for e in ends] + [e * np.logspace(-14, 0, 3000) for e in ends]
    return np.unique(np.concatenate(parts))


def naive_ema_weights(n: int, betas: list[float]) -> np.ndarray:
    """Weights of updates 1..n in ``avg <- beta_t avg + (1 - beta_t) w_t``: the update loop on one-hot vectors."""
    avg = np.zeros(n)
    for t in range(1, n + 1):
        w = np.zeros(n)
        w[t - 1] = 1.0
        avg = betas[t - 1] * avg + (1 - betas[t - 1]) * w
    return avg


# ---------------------------------------------------------------------------------------------- gamma <-> sigma_rel
def test_sigma_rel_to_gamma_matches_the_published_examples() -> None:
    # POSTHOC.md: sigma_rel 0.05 -> gamma ~ 16.97; 0.10 -> ~ 6.94 (EDM2's two tracked averages).
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


@settings(deadline=None)
@given(sigma_rels)
def test_sigma_rel_round_trip(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)


@settings(deadline=None)
@given(gammas)
def test_gamma_round_trip_and_the_cubic(gamma: float) -> None:
    s = gamma_to_sigma_rel(gamma)
    assert 0 < s < SIGMA_REL_MAX
    q = s**-2
    assert gamma**3 + 7 * gamma**2 + (16 - q) * gamma + (12 - q) == pytest.approx(0.0, abs=1e-9 * q * (gamma + 1))
    assert sigma_rel_to_gamma(s) == pytest.approx(gamma, rel=1e-9)


@settings(deadline=None)
@given(gammas)
def test_sigma_rel_is_the_relative_std_of_the_density(gamma: float) -> None:
    # Moments of p(tau) = (g+1) tau^g on [0, 1]: E[tau] = (g+1)/(g+2), E[tau^2] = (g+1)/(g+3).
    mean, second = (gamma + 1) / (gamma + 2), (gamma + 1) / (gamma + 3)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(second - mean**2), rel=1e-9)


def test_sigma_rel_shrinks_as_gamma_grows() -> None:
    values = [gamma_to_sigma_rel(g) for g in (0.01, 0.1, 1, 5, 20, 100)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    "bad", [0, 0.0, -0.1, SIGMA_REL_MAX * (1 + 1e-12), 0.3, 1.0, math.nan, math.inf, True, "0.1", None]
)
def test_sigma_rel_out_of_range_names_the_argument_value_and_range(bad: object) -> None:
    with pytest.raises(ValueError, match=r"sigma_rel must be a real number in \(0, 1/sqrt\(12\)") as info:
        sigma_rel_to_gamma(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="sigma_rel"):
        PowerProfile.from_sigma_rel(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1e-300, -1.0, math.inf, math.nan, False])
def test_gamma_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"gamma must be a finite real number of 0 or more, got"):
        gamma_to_sigma_rel(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- beta and weights
@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.floats(min_value=0.05, max_value=60.0))
def test_power_beta_updates_give_the_closed_form_weights(n: int, gamma: float) -> None:
    betas = [power_beta(t, gamma) for t in range(1, n + 1)]
    expected = np.array([(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1) for k in range(1, n + 1)])
    np.testing.assert_allclose(naive_ema_weights(n, betas), expected, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(power_weights(n, gamma), expected, rtol=1e-9, atol=1e-300)


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=10_000), gammas)
def test_power_weights_are_a_distribution_rising_towards_the_present(n: int, gamma: float) -> None:
    w = power_weights(n, gamma)
    assert w.shape == (n,)
    assert np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, rel=1e-9)
    assert np.all(np.diff(w) >= -1e-15)  # gamma > 0: later updates weigh more


@settings(deadline=None)
@given(st.floats(min_value=0.05, max_value=40.0))
def test_power_weight_of_an_update_is_the_density_integrated_over_its_step(gamma: float) -> None:
    n = 7
    bins = []
    for k in range(1, n + 1):
        tau = grid(1.0, points=20_001) + (k - 1)
        bins.append(integrate(power_density(gamma, n, tau), tau))
    np.testing.assert_allclose(power_weights(n, gamma), bins, rtol=1e-5, atol=1e-12)  # trapezoid error at tau**g, g<1


def test_first_update_copies() -> None:
    assert power_beta(1, 6.94) == 0.0
    assert HalfLifeProfile(10).beta(1) == 0.0
    assert HalfLifeProfile(10).beta(11) == pytest.approx(0.5 ** (1 / 10))


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_power_beta_needs_an_update_number(bad: object) -> None:
    with pytest.raises(ValueError, match=r"t must be an integer >= 1"):
        power_beta(bad, 1.0)  # type: ignore[arg-type]


def test_power_weights_needs_a_count() -> None:
    with pytest.raises(ValueError, match=r"n must be an integer >= 1 \(the number of updates\), got 0"):
        power_weights(0, 1.0)


# ---------------------------------------------------------------------------------------------- inner products
@settings(max_examples=30, deadline=None)
@given(
    st.floats(min_value=0.1, max_value=30.0),
    st.floats(min_value=1.0, max_value=1000.0),
    st.floats(min_value=0.1, max_value=30.0),
    st.floats(min_value=1.0, max_value=1000.0),
)
def test_power_inner_matches_numerical_integration(ga: float, ta: float, gb: float, tb: float) -> None:
    tau = grid(min(ta, tb))  # the product vanishes after the earlier profile's end
    expected = integrate(power_density(ga, ta, tau) * power_density(gb, tb, tau), tau)
    assert power_inner(ga, ta, gb, tb) == pytest.approx(expected, rel=1e-4)
    assert power_inner(gb, tb, ga, ta) == power_inner(ga, ta, gb, tb)


def test_power_inner_is_finite_at_large_times_and_exponents() -> None:
    value = power_inner(500.0, 1e9, 800.0, 2e9)
    assert math.isfinite(value) and value >= 0
    # Both profiles at the same time: (g+1)^2 / ((2g+1) t).
    assert power_inner(500.0, 1e9, 500.0, 1e9) == pytest.approx(501**2 / (1001 * 1e9), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    st.floats(min_value=1.0, max_value=300.0),
    st.floats(min_value=1.0, max_value=1000.0),
    st.floats(min_value=1.0, max_value=300.0),
    st.floats(min_value=1.0, max_value=1000.0),
)
def test_exponential_inner_matches_numerical_integration(ha: float, ta: float, hb: float, tb: float) -> None:
    tau = grid(min(ta, tb), points=400_001)
    expected = integrate(exp_density(ha, ta, tau) * exp_density(hb, tb, tau), tau)
    assert exponential_inner(ha, ta, hb, tb) == pytest.approx(expected, rel=1e-4, abs=1e-14)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 5.0])
@pytest.mark.parametrize(("t_p", "half_life", "t_e"), [(100.0, 10.0, 100.0), (50.0, 30.0, 80.0), (80.0, 3.0, 60.0)])
def test_power_exponential_inner_matches_the_closed_form_for_integer_gamma(
    gamma: float, t_p: float, half_life: float, t_e: float
) -> None:
    # I_g(a) = integral_0^1 (1-v)^g e^{-a v} dv obeys I_0 = (1 - e^{-a})/a, I_g = 1/a - (g/a) I_{g-1}.
    c = math.log(2) / half_life
    m = min(t_p, t_e)
    a = c * m
    integral = (1 - math.exp(-a)) / a
    for g in range(1, int(gamma) + 1):
        integral = 1 / a - g / a * integral
    expected = (gamma + 1) * c * (m / t_p) ** (gamma + 1) * math.exp(-c * (t_e - m)) * integral
    assert power_exponential_inner(gamma, t_p, half_life, t_e) == pytest.approx(expected, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    st.floats(min_value=0.05, max_value=60.0),
    st.floats(min_value=5.0, max_value=1000.0),
    st.floats(min_value=0.5, max_value=500.0),
    st.floats(min_value=5.0, max_value=1000.0),
)
def test_power_exponential_inner_matches_numerical_integration(gamma: float, t_p: float, h: float, t_e: float) -> None:
    tau = grid(min(t_p, t_e), points=400_001)
    expected = integrate(power_density(gamma, t_p, tau) * exp_density(h, t_e, tau), tau)
    got = power_exponential_inner(gamma, t_p, h, t_e)
    assert got == pytest.approx(expected, rel=2e-3, abs=1e-12 * max(1.0, expected))
    assert profile_inner(HalfLifeProfile(h), t_e, PowerProfile(gamma), t_p) == got


# ---------------------------------------------------------------------------------------------- least squares
def brute_force_coefficients(snapshots: list[tuple[object, float]], target: object, t: float) -> np.ndarray:
    """A and b from numerically integrated densities, solved directly, rescaled to sum 1."""
    tau = grid(*(ti for _, ti in snapshots), t, points=400_001)
    dens = [density(p, ti, tau) for p, ti in snapshots]
    goal = density(target, t, tau)
    a = np.array([[integrate(di * dj, tau) for dj in dens] for di in dens])
    b = np.array([integrate(di * goal, tau) for di in dens])
    x = np.linalg.solve(a, b)
    return x / x.sum()


def test_solve_coefficients_matches_a_brute_force_solution() -> None:
    s05, s10 = PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.10)
    snapshots: list[tuple[object, float]] = [(s05, 400.0), (s10, 400.0), (s05, 700.0), (s10, 700.0), (s05, 1000.0)]
    target = PowerProfile.from_sigma_rel(0.07)
    expected = brute_force_coefficients(snapshots, target, 1000.0)
    got = solve_coefficients(snapshots, target, 1000.0)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert got.sum() == pytest.approx(1.0)


def test_solve_coefficients_for_a_half_life_target_matches_a_brute_force_solution() -> None:
    s05, s10 = PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.10)
    snapshots: list[tuple[object, float]] = [(s05, 600.0), (s10, 600.0), (s05, 800.0), (s10, 1000.0), (s05, 1000.0)]
    target = HalfLifeProfile(60.0)
    expected = brute_force_coefficients(snapshots, target, 1000.0)
    np.testing.assert_allclose(solve_coefficients(snapshots, target, 1000.0), expected, rtol=1e-3, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(gammas, st.integers(10, 5000)), min_size=1, max_size=6, unique_by=lambda p: p), st.data())
def test_a_tracked_profile_at_a_snapshot_time_is_that_snapshot(
    pairs: list[tuple[float, int]], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(pairs) - 1))
    gamma, t = pairs[i]
    x = solve_coefficients(pairs, gamma, t)
    # a profile one rounding away from the target's (gamma 0.05 and 0.05000000000000001) is the same profile
    duplicates = [k for k, (g, u) in enumerate(pairs) if u == t and math.isclose(g, gamma, rel_tol=1e-9)]
    assert sum(x[k] for k in duplicates) == pytest.approx(1.0, abs=1e-6)
    assert np.abs(np.delete(x, duplicates)).max(initial=0.0) < 1e-6
    assert fit_error(pairs, x, gamma, t) < 1e-6


def test_snapshots_after_the_target_time_get_no_weight() -> None:
    snapshots = [(10.0, 100), (3.0, 100), (10.0, 200), (3.0, 200), (10.0, 300)]
    x = solve_coefficients(snapshots, 5.0, 200)
    assert x[4] == 0.0
    assert x.sum() == pytest.approx(1.0)


def test_reconstructed_discrete_weights_match_the_target_average() -> None:
    # What matters in the end: the per-update weights of sum_i x_i avg_i against those of a tracked 0.07 average.
    n_total, every = 2000, 100
    g05, g10, g07 = (sigma_rel_to_gamma(s) for s in (0.05, 0.10, 0.07))
    times = list(range(every, n_total + 1, every))
    snapshots = [(g, t) for t in times for g in (g05, g10)]
    x = solve_coefficients(snapshots, g07, n_total)
    combined = np.zeros(n_total)
    for (g, t), xi in zip(snapshots, x, strict=True):
        combined[:t] += xi * power_weights(t, g)
    target = power_weights(n_total, g07)
    assert np.linalg.norm(combined - target) / np.linalg.norm(target) < 0.01


def test_target_after_the_last_snapshot_is_refused() -> None:
    with pytest.raises(ValueError, match=r"t=301 is after the last snapshot \(t=300\)"):
        solve_coefficients([(1.0, 100), (1.0, 300)], 2.0, 301)


def test_empty_or_malformed_snapshot_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="snapshots is empty"):
        solve_coefficients([], 1.0, 10)
    with pytest.raises(TypeError, match=r"snapshots\[0\] must be a \(profile or gamma, t\) pair"):
        solve_coefficients([(1.0,)], 1.0, 10)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"snapshots\[1\]\[1\] \(t\)"):
        solve_coefficients([(1.0, 5), (1.0, -5)], 1.0, 5)
    with pytest.raises(ValueError, match=r"t must be a finite time"):
        solve_coefficients([(1.0, 5)], 1.0, 0)


def test_profiles_round_trip_through_their_dicts() -> None:
    for profile in (PowerProfile.from_sigma_rel(0.07), HalfLifeProfile(123.5)):
        assert profile_from_dict(profile.to_dict()) == profile
    assert profile_from_dict({"kind": "power", "sigma_rel": 0.1}) == PowerProfile.from_sigma_rel(0.1)
    with pytest.raises(ValueError, match=r"meta: kind must be 'power' or 'half_life', got 'cosine'"):
        profile_from_dict({"kind": "cosine"}, "meta")
    with pytest.raises(ValueError, match=r"a 'half_life' profile needs 'half_life_updates'"):
        profile_from_dict({"kind": "half_life"})
    with pytest.raises(ValueError, match="half_life must be a finite real number greater than 0, got -2"):
        HalfLifeProfile(-2)
