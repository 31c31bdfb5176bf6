"""Averaging profiles, their inner products, and the least-squares fit that reconstructs one from others.

A *profile* is the density of the weights an average gives to the updates it has seen, over the time axis
``tau`` in ``[0, t]`` where ``t`` counts EMA updates since the average started:

- power function (EDM2): ``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)``; its relative width
  ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))`` is a fixed fraction of ``t``. Tracked by
  ``ema <- beta_t ema + (1 - beta_t) w_t`` with ``beta_t = (1 - 1/t)**(gamma + 1)``: update ``k`` of ``n`` then
  weighs exactly ``integral of p over [k - 1, k]`` = ``(k**(gamma+1) - (k-1)**(gamma+1)) / n**(gamma+1)``.
- constant half-life ``h`` (a classic EMA): ``p(tau) = c exp(-c (t - tau))`` with ``c = ln 2 / h``; tracked with
  ``beta = 2**(-1/h)`` after a first update that copies. The first update's extra mass ``2**(-t/h)`` (the copy)
  is left out of the density: it is negligible once ``t`` is a few half-lives.

Given snapshots ``i`` (profile ``p_i`` at time ``t_i``) and a target profile at ``t*``, the coefficients ``x``
minimise ``|| sum_i x_i p_i - p* ||`` in L2 over ``tau``: ``A x = b`` with ``A_ij = <p_i, p_j>``,
``b_i = <p_i, p*>``, solved by least squares and rescaled to sum to 1. Power x power and exponential x
exponential inner products are closed forms; power x exponential is integrated numerically (numpy only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "SIGMA_REL_MAX",
    "HalfLifeProfile",
    "PowerProfile",
    "Profile",
    "UniformWindow",
    "exponential_inner",
    "fit_error",
    "gamma_to_sigma_rel",
    "power_beta",
    "power_exponential_inner",
    "power_inner",
    "power_weights",
    "profile_from_dict",
    "profile_inner",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "solve_normal_equations",
    "usable_sources",
]

#: The widest power profile, gamma = 0: the uniform average over [0, t], whose relative std is 1/sqrt(12).
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)


def _real(value: object, name: str, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return number


def _check_sigma_rel(sigma_rel: object, name: str = "sigma_rel") -> float:
    accepted = f"a real number in (0, 1/sqrt(12) = {SIGMA_REL_MAX:.6f}]"
    value = _real(sigma_rel, name, accepted)
    if not 0.0 < value <= SIGMA_REL_MAX:
        raise ValueError(f"{name} must be {accepted}, got {sigma_rel!r}")
    return value


def _check_gamma(gamma: object, name: str = "gamma") -> float:
    accepted = "a finite real number of 0 or more"
    value = _real(gamma, name, accepted)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be {accepted}, got {gamma!r}")
    return value


def _check_positive(value: object, name: str, what: str = "a finite real number greater than 0") -> float:
    number = _real(value, name, what)
    if not 0.0 < number < math.inf:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power profile with exponent ``gamma`` (>= 0)."""
    g = _check_gamma(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power profile whose relative standard deviation is ``sigma_rel``.

    ``gamma`` is the largest real root of ``g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2)``, polished with
    Newton steps; ``sigma_rel`` must lie in ``(0, 1/sqrt(12)]``, whose end is the uniform profile, gamma 0.
    """
    s = _check_sigma_rel(sigma_rel)
    if s == SIGMA_REL_MAX:
        return 0.0
    q = 1.0 / (s * s)
    roots = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q])
    g = float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real))))
    for _ in range(3):  # Newton on the cubic: np.roots is accurate to a few ulps of the largest root only
        f = ((g + 7.0) * g + 16.0 - q) * g + 12.0 - q
        df = (3.0 * g + 14.0) * g + 16.0 - q
        if df == 0.0:
            break
        g -= f / df
    return g if g > 0.0 else float(np.nextafter(0.0, 1.0))


def power_beta(t: int, gamma: float) -> float:
    """The smoothing of the ``t``-th update (``t`` = 1, 2, ...) of a power-profile average: ``(1 - 1/t)**(gamma+1)``.

    ``beta_1 = 0``: the first update copies the weights. Blend with weight ``1 - power_beta(t, gamma)``.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
        raise ValueError(f"t must be an integer >= 1 (the number of this update), got {t!r}")
    g = _check_gamma(gamma)
    return (1.0 - 1.0 / int(t)) ** (g + 1.0)


def power_weights(n: int, gamma: float) -> np.ndarray:
    """Weights of updates ``k = 1..n`` in a power-profile average after ``n`` updates (closed form, float64).

    ``w_k = (k**(gamma+1) - (k-1)**(gamma+1)) / n**(gamma+1)``, computed as ``(k/n)**(gamma+1) - ((k-1)/n)**(gamma+1)``
    so that large ``n`` and ``gamma`` do not overflow. They sum to 1.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of updates), got {n!r}")
    g = _check_gamma(gamma)
    k = np.arange(1, int(n) + 1, dtype=np.float64)
    return (k / n) ** (g + 1.0) - ((k - 1.0) / n) ** (g + 1.0)


# ---------------------------------------------------------------------------------------------- profiles
@dataclasses.dataclass(frozen=True)
class PowerProfile:
    """The power-function profile with exponent ``gamma`` (>= 0); its width is ``sigma_rel`` of the time.

    ``gamma = 0`` (``sigma_rel = 1/sqrt(12)``) is the uniform average of every update so far: tracked, it lets
    reconstruction give uniform windows (SWA) exactly.
    """

    gamma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", _check_gamma(self.gamma))

    @classmethod
    def from_sigma_rel(cls, sigma_rel: float) -> PowerProfile:
        """The power profile of relative width ``sigma_rel`` in ``(0, 1/sqrt(12)]``."""
        return cls(sigma_rel_to_gamma(sigma_rel))

    @property
    def sigma_rel(self) -> float:
        """Relative standard deviation of the profile."""
        return gamma_to_sigma_rel(self.gamma)

    def beta(self, t: int) -> float:
        """Smoothing of update number ``t`` (1-based): :func:`power_beta`."""
        return power_beta(t, self.gamma)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, as stored in snapshot metadata."""
        return {"kind": "power", "sigma_rel": self.sigma_rel, "gamma": self.gamma}

    def __str__(self) -> str:
        return f"power(sigma_rel={self.sigma_rel:.6g}, gamma={self.gamma:.6g})"


@dataclasses.dataclass(frozen=True)
class HalfLifeProfile:
    """A constant half-life of ``half_life`` EMA updates (a classic EMA)."""

    half_life: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "half_life", _check_positive(self.half_life, "half_life"))

    @property
    def rate(self) -> float:
        """``c = ln 2 / half_life``: the density is ``c exp(-c (t - tau))``."""
        return math.log(2.0) / self.half_life

    def beta(self, t: int) -> float:
        """Smoothing of update number ``t``: 0 for the first (a copy), ``2**(-1/half_life)`` after."""
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
            raise ValueError(f"t must be an integer >= 1 (the number of this update), got {t!r}")
        return 0.0 if t == 1 else 0.5 ** (1.0 / self.half_life)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, as stored in snapshot metadata."""
        return {"kind": "half_life", "half_life_updates": self.half_life}

    def __str__(self) -> str:
        return f"half_life({self.half_life:.6g} updates)"


@dataclasses.dataclass(frozen=True)
class UniformWindow:
    """A target only: the equal-weight average (SWA) of the last ``length`` updates before its time ``t``.

    Its density is ``1 / length`` on ``[t - length, t]``: the updates after ``t - length`` up to ``t``.
    """

    length: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", _check_positive(self.length, "window length"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, as stored in a reconstruction's metadata."""
        return {"kind": "window", "length_updates": self.length}

    def __str__(self) -> str:
        return f"window(last {self.length:.6g} updates)"


Profile = PowerProfile | HalfLifeProfile


def profile_from_dict(data: Mapping[str, Any], where: str = "profile") -> Profile:
    """The profile described by ``data`` (:meth:`PowerProfile.to_dict` / :meth:`HalfLifeProfile.to_dict`).

    A power profile is rebuilt from its stored ``gamma`` (``sigma_rel`` is informative). ``where`` names the
    source in errors.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a dict with a 'kind', got {data!r}")
    kind = data.get("kind")
    try:
        if kind == "power":
            if "gamma" in data:
                return PowerProfile(data["gamma"])
            return PowerProfile.from_sigma_rel(data["sigma_rel"])
        if kind == "half_life":
            return HalfLifeProfile(data["half_life_updates"])
    except KeyError as e:
        raise ValueError(f"{where}: a {kind!r} profile needs {e.args[0]!r}, got {dict(data)!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: kind must be 'power' or 'half_life', got {kind!r}")


def _as_profile(profile: object, name: str) -> Profile | UniformWindow:
    if isinstance(profile, (PowerProfile, HalfLifeProfile, UniformWindow)):
        return profile
    if isinstance(profile, numbers.Real) and not isinstance(profile, bool):
        return PowerProfile(_check_gamma(profile, name))
    raise TypeError(f"{name} must be a PowerProfile, a HalfLifeProfile or a gamma (float), got {profile!r}")


# ---------------------------------------------------------------------------------------------- inner products
def power_inner(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """``integral p_a p_b dtau`` for power profiles ``(gamma_a at t_a)`` and ``(gamma_b at t_b)``.

    With ``t_a <= t_b``: ``(ga+1)(gb+1) (t_a/t_b)**gb / ((ga+gb+1) t_b)`` (roles swapped otherwise): a ratio
    below 1 raised to a power, so large times and exponents neither overflow nor lose precision.
    """
    ga, gb = _check_gamma(gamma_a, "gamma_a"), _check_gamma(gamma_b, "gamma_b")
    ta, tb = _check_positive(t_a, "t_a"), _check_positive(t_b, "t_b")
    if ta > tb:
        ga, ta, gb, tb = gb, tb, ga, ta
    return (ga + 1.0) * (gb + 1.0) * (ta / tb) ** gb / ((ga + gb + 1.0) * tb)


def exponential_inner(half_life_a: float, t_a: float, half_life_b: float, t_b: float) -> float:
    """``integral p_a p_b dtau`` for two constant half-life profiles (closed form).

    ``c_a c_b / (c_a + c_b) * exp(-c_a (t_a - m) - c_b (t_b - m)) * (1 - exp(-(c_a + c_b) m))``, ``m = min(t_a, t_b)``.
    """
    ca = math.log(2.0) / _check_positive(half_life_a, "half_life_a")
    cb = math.log(2.0) / _check_positive(half_life_b, "half_life_b")
    ta, tb = _check_positive(t_a, "t_a"), _check_positive(t_b, "t_b")
    m = min(ta, tb)
    return ca * cb / (ca + cb) * math.exp(-ca * (ta - m) - cb * (tb - m)) * -math.expm1(-(ca + cb) * m)


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def _panels(length: float) -> np.ndarray:
    """Breakpoints on [0, 1]: geometric towards 0 (scale ``length``) and towards 1 (an endpoint singularity)."""
    low = length * 2.0 ** np.arange(-4, 64)
    low = low[low < 0.5]
    high = 1.0 - 0.5 * 2.0 ** -np.arange(0, 48, dtype=np.float64)
    return np.unique(np.concatenate([[0.0], low, high, [1.0]]))


def _power_exp_integral(gamma: float, a: float) -> float:
    """``integral_0^1 (1 - v)**gamma exp(-a v) dv`` for gamma > -1, a >= 0, by Gauss-Legendre on geometric panels.

    The integrand decays like ``exp(-(gamma + a) v)`` from 0, so panels double in width from ``1/(gamma + a + 1)/16``;
    near ``v = 1`` they halve towards 1, where ``(1 - v)**gamma`` is not smooth for non-integer gamma.
    """
    edges = _panels(1.0 / (gamma + a + 1.0))
    lo, hi = edges[:-1, None], edges[1:, None]
    half = (hi - lo) / 2.0
    v = lo + half * (_NODES[None, :] + 1.0)
    values = np.exp(gamma * np.log1p(-np.minimum(v, _BELOW_ONE)) - a * v)
    return float(np.sum(half * values * _WEIGHTS[None, :]))


def power_exponential_inner(gamma: float, t_p: float, half_life: float, t_e: float) -> float:
    """``integral p_power p_exp dtau`` for a power profile ``(gamma at t_p)`` and a half-life one ``(at t_e)``.

    With ``m = min(t_p, t_e)``, ``c = ln 2 / half_life`` and ``tau = m (1 - v)``:
    ``(gamma+1) c (m/t_p)**(gamma+1) exp(-c (t_e - m)) * integral_0^1 (1-v)**gamma exp(-c m v) dv``,
    the last factor integrated numerically.
    """
    g = _check_gamma(gamma)
    c = math.log(2.0) / _check_positive(half_life, "half_life")
    tp, te = _check_positive(t_p, "t_p"), _check_positive(t_e, "t_e")
    m = min(tp, te)
    scale = (g + 1.0) * c * (m / tp) ** (g + 1.0) * math.exp(-c * (te - m))
    if scale == 0.0:
        return 0.0
    return scale * _power_exp_integral(g, c * m)


def _window_inner(window: UniformWindow, t_w: float, other: Profile | UniformWindow, t_o: float) -> float:
    """``integral p_window p_other dtau``: ``1 / length`` times the other's mass on the window (closed forms)."""
    lo, hi = max(t_w - window.length, 0.0), min(t_w, t_o)
    if isinstance(other, UniformWindow):
        lo = max(lo, t_o - other.length)
        return max(hi - lo, 0.0) / (window.length * other.length)
    if hi <= lo:
        return 0.0
    if isinstance(other, PowerProfile):  # the cumulative (tau / t_o)**(gamma + 1), as ratios below 1
        g = other.gamma + 1.0
        return ((hi / t_o) ** g - (lo / t_o) ** g) / window.length
    c = other.rate  # the cumulative exp(-c (t_o - tau))
    return math.exp(-c * (t_o - hi)) * -math.expm1(-c * (hi - lo)) / window.length


def profile_inner(a: Profile | UniformWindow, t_a: float, b: Profile | UniformWindow, t_b: float) -> float:
    """``integral p_a p_b dtau`` for any two profiles at times ``t_a`` and ``t_b``."""
    if isinstance(a, UniformWindow):
        return _window_inner(a, t_a, b, t_b)
    if isinstance(b, UniformWindow):
        return _window_inner(b, t_b, a, t_a)
    if isinstance(a, PowerProfile) and isinstance(b, PowerProfile):
        return power_inner(a.gamma, t_a, b.gamma, t_b)
    if isinstance(a, HalfLifeProfile) and isinstance(b, HalfLifeProfile):
        return exponential_inner(a.half_life, t_a, b.half_life, t_b)
    if isinstance(a, PowerProfile) and isinstance(b, HalfLifeProfile):
        return power_exponential_inner(a.gamma, t_a, b.half_life, t_b)
    if isinstance(a, HalfLifeProfile) and isinstance(b, PowerProfile):
        return power_exponential_inner(b.gamma, t_b, a.half_life, t_a)
    raise TypeError(f"profiles must be PowerProfile or HalfLifeProfile, got {a!r} and {b!r}")


# ---------------------------------------------------------------------------------------------- least squares
def _sources(snapshots: Sequence[tuple[object, object]]) -> list[tuple[Profile, float]]:
    if isinstance(snapshots, (str, bytes)) or not isinstance(snapshots, Sequence):
        raise TypeError(f"snapshots must be a sequence of (profile or gamma, t) pairs, got {snapshots!r}")
    out = []
    for i, item in enumerate(snapshots):
        if not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"snapshots[{i}] must be a (profile or gamma, t) pair, got {item!r}")
        profile = _as_profile(item[0], f"snapshots[{i}][0]")
        if isinstance(profile, UniformWindow):
            raise TypeError(f"snapshots[{i}][0]: a window is a target, not a tracked profile, got {profile}")
        out.append((profile, _check_positive(item[1], f"snapshots[{i}][1] (t)")))
    return out


@functools.lru_cache(maxsize=8)
def _gram(sources: tuple[tuple[Profile, float], ...]) -> np.ndarray:
    """``A_ij = <p_i, p_j>``, kept for the last few snapshot sets: a sweep fits many targets to the same ones."""
    n = len(sources)
    a = np.empty((n, n))
    for i, (pi, ti) in enumerate(sources):
        for j in range(i, n):
            pj, tj = sources[j]
            a[i, j] = a[j, i] = profile_inner(pi, ti, pj, tj)
    a.flags.writeable = False
    return a


def _normal_equations(
    sources: Sequence[tuple[Profile, float]], target: Profile | UniformWindow, t: float
) -> tuple[np.ndarray, np.ndarray]:
    b = np.array([profile_inner(p, ti, target, t) for p, ti in sources])
    return _gram(tuple(sources)), b


def usable_sources(
    snapshots: Sequence[tuple[object, object]], t: object
) -> tuple[list[tuple[Profile, float]], list[int], float]:
    """The checked ``(profile, t_i)`` pairs, the positions of those with ``t_i <= t`` (the ones a fit may use),
    and ``t`` checked; see :func:`solve_coefficients` for what is refused."""
    sources = _sources(snapshots)
    t_star = _check_positive(t, "t", "a finite time (EMA updates) greater than 0")
    if not sources:
        raise ValueError("snapshots is empty: at least one snapshot is needed to reconstruct an average")
    last = max(ti for _, ti in sources)
    if t_star > last:
        raise ValueError(f"t={t!r} is after the last snapshot (t={last:g}): a reconstruction cannot extrapolate")
    used = [i for i, (_, ti) in enumerate(sources) if ti <= t_star]
    if not used:
        first = min(ti for _, ti in sources)
        raise ValueError(f"t={t!r} is before the first snapshot (t={first:g}): no snapshot has t <= {t!r}")
    return sources, used, t_star


def solve_normal_equations(a: np.ndarray, b: np.ndarray, goal: object, t: float, latest: float) -> np.ndarray:
    """The least-squares solution of ``a x = b`` rescaled to sum to 1 (``goal`` at ``t`` names the target in errors;
    ``latest`` is the time of the latest snapshot used).

    The solve is scaled by the diagonal of ``a`` (the Gram matrix is ill-conditioned when snapshots are close).

    Raises:
        ValueError: ``b`` is 0 (no snapshot used gives weight to any update the target weighs: a window or kernel
            after the latest snapshot at or before ``t``), or the coefficients sum to 0 or to no finite number.
    """
    if not np.any(b > 0.0):
        raise ValueError(
            f"the snapshots cannot represent {goal} at t={t:g}: the latest one at or before t (t={latest:g}) and "
            "those before it give no weight to any update it weighs; reconstruct at a later snapshot's t, or choose "
            "a target that reaches back to the updates before it"
        )
    d = 1.0 / np.sqrt(np.diag(a))
    y = np.linalg.lstsq(a * d[:, None] * d[None, :], b * d, rcond=None)[0]
    x = y * d
    total = float(np.sum(x))
    if not math.isfinite(total) or abs(total) <= 1e-12 * float(np.sum(np.abs(x))):
        raise ValueError(f"the snapshots cannot represent {goal} at t={t:g}: the fitted coefficients sum to {total!r}")
    return x / total


def solve_coefficients(snapshots: Sequence[tuple[object, object]], target: object, t: float) -> np.ndarray:
    """Coefficients ``x`` (one per snapshot, summing to 1) with ``sum_i x_i p_i`` closest to ``target`` at ``t``.

    ``snapshots`` are ``(profile, t_i)`` pairs (a float profile is a power profile's gamma); ``target`` is a
    profile or a gamma. Only snapshots with ``t_i <= t`` are used (the others get 0): a later snapshot has
    seen updates the target has not. See :func:`solve_normal_equations` for the solve.

    Raises:
        ValueError: ``t`` is not > 0, no snapshot has ``t_i <= t``, ``t`` is after the last snapshot, no snapshot
            used weighs any update the target weighs, or the fit is degenerate (its coefficients sum to 0).
    """
    sources, used, t_star = usable_sources(snapshots, t)
    goal = _as_profile(target, "target")
    a, b = _normal_equations([sources[i] for i in used], goal, t_star)
    x = np.zeros(len(sources))
    x[used] = solve_normal_equations(a, b, goal, t_star, max(sources[i][1] for i in used))
    return x


def fit_error(snapshots: Sequence[tuple[object, object]], x: Sequence[float], target: object, t: float) -> float:
    """Relative L2 error of the fitted profile: ``|| sum_i x_i p_i - p* || / || p* ||`` (0 is a perfect fit)."""
    sources = _sources(snapshots)
    goal = _as_profile(target, "target")
    t_star = _check_positive(t, "t")
    coefficients = np.asarray(x, dtype=np.float64)
    if coefficients.shape != (len(sources),):
        raise ValueError(f"x must have one coefficient per snapshot ({len(sources)}), got shape {coefficients.shape}")
    keep = [i for i in range(len(sources)) if coefficients[i] != 0.0]
    a, b = _normal_equations([sources[i] for i in keep], goal, t_star)
    xk = coefficients[keep]
    target_norm = profile_inner(goal, t_star, goal, t_star)
    squared = float(xk @ a @ xk - 2.0 * xk @ b + target_norm)
    return math.sqrt(max(squared, 0.0) / target_norm)
