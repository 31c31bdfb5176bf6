"""Post-hoc targets given as weights over the updates: any kernel ``w_k >= 0``, k = 1..t, fitted from snapshots.

A *kernel* asks for the average ``sum_k w_k theta_k / sum_k w_k`` of the weights ``theta_k`` after each update
``k`` up to the target time ``t``. It is a Python function of the update numbers (:func:`kernel_from_function`)
or a named kernel (:data:`KERNELS`, parsed from ``NAME:PARAMS`` by :func:`parse_kernel`):

- WSM's decay-emulating merges (Tian et al., "WSM: decay-free learning-rate schedule via checkpoint merging",
  2025): on a quadratic, SGD whose learning rate is scaled by ``a(u)`` (``u = k / t``; 1 until the last fraction
  ``f``, then decaying to 0) ends where the constant-rate run's average with weights ``w_k = a((k-1)/t) - a(k/t)``
  lands, to first order in the rate; ``w`` is the rate's drop over update ``k``. With ``s = (u - (1 - f)) / f``
  clipped to [0, 1]: ``cosine`` ``a = (1 + cos(pi s)) / 2``, ``linear`` ``a = 1 - s`` (a uniform window),
  ``1-sqrt`` ``a = 1 - sqrt(s)``.
- ``power:S``, ``ema:H`` and ``uniform:F`` name the profiles of :mod:`~emakit.posthoc.profiles` (``sigma_rel``
  S, a half-life of H updates, the last fraction F of the updates) and are fitted exactly as those are.
- Targets that weigh the raw training weights (:class:`RawTarget`), which only snapshots written with them hold
  (``EMA(..., snapshot_raw=True)``): ``raw``, the training weights at ``t``; ``bema:RHO,GAMMA,KAPPA,ETA``, BEMA's
  output (Block & Zhang, "EMA Without the Lag", 2025) ``EMA_t + alpha_t (theta_t - theta_1)``, its EMA weighing
  update ``n >= 2`` by ``(rho + gamma s_n) ** -kappa`` with ``s_n = (n - 1) x update_interval`` (steps since the
  start; update 1 is the start copy, ``theta_1`` BEMA's ``theta_0``) and ``alpha_t = (rho + gamma s_t) ** -eta``.
  The EMA part is a kernel fitted as above; the raw terms are read, not fitted.

The fit works in the *per-update* measure: each snapshot ``i`` holds ``sum_k m_ik theta_k``, where ``m_ik`` is
the exact weight the tracked average gives update ``k`` (a power profile: ``(k/t_i)**(g+1) - ((k-1)/t_i)**(g+1)``;
a half-life ``h``: ``(1 - beta) beta**(t_i - k)`` with ``beta = 2**(-1/h)``, and ``beta**(t_i - 1)`` for the first
update, which the average copies). The coefficients minimise ``|| sum_i x_i m_i - w ||_2`` over k = 1..t with
``A_ij = sum_k m_ik m_jk``, ``b_i = sum_k m_ik w_k``, and the fit error is ``|| sum_i x_i m_i - w || / || w ||``
(summed directly over the updates, not from ``A`` and ``b``, whose terms cancel when ``A`` is ill-conditioned):
the same relative L2 error as a profile target's, taken over the updates (the piecewise-constant profile with
mass ``w_k`` on ``(k-1, k]``). These sums are the inner products, exactly: the "quadrature" is one term per
update with closed-form masses, so its only error is float64 rounding (about 1e-15 relative). Its cost is ``O(n**2 t)`` for ``n`` snapshot averages, in chunks of
:data:`CHUNK` updates (3 s of CPU time for 60 averages at t = 10**6 on one core).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from emakit.posthoc.profiles import (
    SIGMA_REL_MAX,
    HalfLifeProfile,
    PowerProfile,
    Profile,
    solve_normal_equations,
    usable_sources,
)

__all__ = [
    "BEMA_DEFAULTS",
    "CHUNK",
    "KERNELS",
    "RAW_WEIGHTS",
    "Kernel",
    "KernelFunction",
    "RawTarget",
    "bema_kernel",
    "decay_kernel",
    "kernel_fit",
    "kernel_from_function",
    "parse_kernel",
    "update_weights",
]

#: ``f(k, t)``: the (unnormalised, >= 0) weights of updates ``k`` (a float64 array of 1..t) for a target at ``t``.
KernelFunction = Callable[[np.ndarray, int], Any]
#: Updates per block of the per-update sums (bounds their memory: 8 bytes x averages x CHUNK).
CHUNK = 1 << 16
#: The per-update weights of all snapshots are kept between the two passes up to this size, else computed twice.
_KEEP_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A target given by its weights over the updates: ``function(k, t)`` for k = 1..t (normalised here)."""

    name: str
    function: KernelFunction = dataclasses.field(repr=False)
    params: tuple[float, ...] = ()

    def masses(self, t: int) -> np.ndarray:
        """The weights of updates 1..t, normalised to sum to 1 (float64).

        Raises:
            ValueError: the function's result is not ``t`` finite numbers >= 0 with a positive sum.
        """
        k = np.arange(1, t + 1, dtype=np.float64)
        raw = self.function(k, t)
        try:
            w = np.broadcast_to(np.asarray(raw, dtype=np.float64), (t,)).copy()
        except (TypeError, ValueError):
            raise ValueError(f"kernel {self}: must return one weight per update (t={t} of them), got {raw!r}") from None
        bad = ~np.isfinite(w) | (w < 0.0)
        if bad.any():
            k_bad = int(np.flatnonzero(bad)[0]) + 1
            raise ValueError(
                f"kernel {self}: weights must be finite and >= 0, got {float(w[k_bad - 1])!r} for update {k_bad} (t={t})"
            )
        total = float(w.sum())
        if not total > 0.0:
            raise ValueError(f"kernel {self}: weights all 0 over updates 1..{t}: nothing to average")
        return w / total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, as stored in a reconstruction's metadata."""
        return {"kind": "kernel", "name": self.name, "params": list(self.params)}

    def __str__(self) -> str:
        return f"{self.name}:{','.join(repr(p) for p in self.params)}" if self.params else self.name


def kernel_from_function(function: KernelFunction, name: str | None = None) -> Kernel:
    """A kernel from ``function(k, t)``: weights (>= 0) of the updates ``k`` (float64 array 1..t) at time ``t``.

    Example: ``kernel_from_function(lambda k, t: np.exp((k - t) / 50))`` is an EMA with time constant 50.
    """
    if not callable(function):
        raise TypeError(f"kernel must be a name ('cosine:0.2'), a Kernel or a function f(k, t), got {function!r}")
    label = name if name is not None else getattr(function, "__qualname__", None) or repr(function)
    return Kernel(str(label), function)


# ---------------------------------------------------------------------------------------------- named kernels
def _decay(shape: str) -> Callable[[np.ndarray], np.ndarray]:
    """The learning-rate multiplier ``a(s)`` over the decay phase, s in [0, 1]."""
    if shape == "cosine":
        return lambda s: 0.5 * (1.0 + np.cos(np.pi * s))
    if shape == "linear":
        return lambda s: 1.0 - s
    return lambda s: 1.0 - np.sqrt(s)


def decay_kernel(shape: str, fraction: float) -> Kernel:
    """WSM's merge weights emulating a ``shape`` decay ('cosine', 'linear', '1-sqrt') over the last ``fraction``.

    The weight of update ``k`` is the multiplier's drop over it, ``a((k-1)/t) - a(k/t)`` (see the module's
    docstring): exact masses, summing to 1 whatever ``t``.
    """
    if shape not in _DECAYS:
        raise ValueError(f"decay shape must be one of {', '.join(_DECAYS)}, got {shape!r}")
    f = _fraction(fraction, f"{shape} fraction")
    a = _decay(shape)

    def weights(k: np.ndarray, t: int) -> np.ndarray:
        def multiplier(u: np.ndarray) -> np.ndarray:
            return a(np.clip((u - (1.0 - f)) / f, 0.0, 1.0))

        return multiplier((k - 1.0) / t) - multiplier(k / t)

    return Kernel(shape, weights, (f,))


def _fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction of the updates in (0, 1], got {value!r}")
    return float(value)


_DECAYS = ("cosine", "linear", "1-sqrt")
#: BEMA's parameters (rho, gamma, kappa, eta) in the paper (and emakit's :class:`~emakit.averaging.BEMA`).
BEMA_DEFAULTS = (10.0, 1.0, 0.5, 0.2)


@dataclasses.dataclass(frozen=True)
class RawTarget:
    """A target that weighs the raw training weights: ``raw`` (those at ``t``) or ``bema`` (BEMA's output).

    :meth:`parts` splits it into what is fitted from the averages and what is read from the snapshots.
    """

    name: str
    params: tuple[float, ...] = ()

    def parts(self, t: int, update_interval: int) -> tuple[Kernel | None, float, float]:
        """(the kernel fitted from the averages or None, the weight of the raw weights at ``t``, the weight of
        ``theta_1``, those at the start), for a target at update ``t`` with ``update_interval`` steps per update.

        Raises:
            ValueError: BEMA's first update would weigh more than 1 (``rho + gamma * update_interval < 1``).
        """
        if self.name == "raw":
            return None, 1.0, 0.0
        rho, gamma, kappa, eta = self.params
        phi = float(update_interval)
        if kappa > 0 and t > 1 and rho + gamma * phi < 1:
            raise ValueError(
                f"kernel {self}: rho + gamma * update_interval must be 1 or more (the first update's weight "
                f"(rho + gamma * s) ** -kappa would exceed 1), got update_interval={update_interval} in the snapshots"
            )

        def ema(k: np.ndarray, t: int) -> np.ndarray:
            w = np.where(k == 1.0, 1.0, (rho + gamma * (k - 1.0) * phi) ** -kappa)
            with np.errstate(divide="ignore"):
                keep = np.log1p(-np.minimum(w, 1.0))  # -inf for an update that replaces the average
            later = np.concatenate([np.cumsum(keep[::-1])[::-1][1:], [0.0]])  # sum over the updates after k
            return w * np.exp(later)

        alpha = (rho + gamma * (t - 1) * phi) ** -eta
        return Kernel("bema-ema", ema, (rho, gamma, kappa)), alpha, -alpha

    def weights(self, t: int, update_interval: int) -> np.ndarray:
        """The weight of every update 1..t in the target (float64; BEMA's first is negative)."""
        kernel, now, start = self.parts(t, update_interval)
        w = kernel.masses(t) if kernel is not None else np.zeros(t)
        w[t - 1] += now
        w[0] += start
        return w

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, as stored in a reconstruction's metadata."""
        return {"kind": self.name, "params": list(self.params)}

    def __str__(self) -> str:
        return f"{self.name}:{','.join(repr(p) for p in self.params)}" if self.params else self.name


def bema_kernel(rho: float = 10.0, gamma: float = 1.0, kappa: float = 0.5, eta: float = 0.2) -> RawTarget:
    """BEMA's output at ``t`` as a post-hoc target (the paper's parameters; see the module's docstring)."""
    for name, value in (("rho", rho), ("gamma", gamma), ("kappa", kappa), ("eta", eta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < math.inf:
            raise ValueError(f"kernel bema: {name} must be a finite number of 0 or more, got {value!r}")
    return RawTarget("bema", (float(rho), float(gamma), float(kappa), float(eta)))


#: The raw training weights at ``t`` as a target (snapshots written with ``snapshot_raw=True``).
RAW_WEIGHTS = RawTarget("raw")

#: Named kernels: name -> (parameters, what it accepts, what the kernel is).
KERNELS: dict[str, tuple[str, str]] = {
    "cosine": ("F", "WSM merge emulating a cosine learning-rate decay to 0 over the last fraction F in (0, 1]"),
    "linear": ("F", "WSM merge emulating a linear decay to 0 over the last fraction F (a uniform window there)"),
    "1-sqrt": ("F", "WSM merge emulating a 1-sqrt decay to 0 over the last fraction F in (0, 1]"),
    "power": ("S", f"the power profile of width sigma_rel S in (0, 1/sqrt(12) = {SIGMA_REL_MAX:.4f}] (--sigma-rel)"),
    "ema": ("H", "a classic EMA with a half-life of H > 0 updates (--half-life)"),
    "uniform": ("F", "the equal-weight average of the last fraction F in (0, 1] of the updates (--window F)"),
    "bema": (
        "RHO,GAMMA,KAPPA,ETA",
        "BEMA's output (each finite and >= 0; 'bema' alone: the paper's 10,1,0.5,0.2); needs raw snapshots",
    ),
    "raw": ("", "the raw training weights at t (no parameter); needs snapshots written with snapshot_raw=True"),
}

_SPEC = re.compile(r"(?P<name>[a-z0-9-]+)(?::(?P<value>[^:\s]+))?")


def kernel_spec(name: str) -> str:
    """How a named kernel is written: ``NAME:PARAMS``, or ``NAME`` for one without parameters."""
    return f"{name}:{KERNELS[name][0]}" if KERNELS[name][0] else name


def parse_kernel(text: str) -> dict[str, Any]:
    """The target ``NAME:VALUE`` names (:data:`KERNELS`), as keyword arguments of
    :func:`~emakit.posthoc.reconstruction.plan_reconstruction`: ``{"kernel": Kernel}`` for a decay,
    ``{"kernel": RawTarget}`` for ``raw`` and ``bema``, ``{"sigma_rel": S}``, ``{"half_life": H}`` or
    ``{"window": F}`` for the profiles.

    Raises:
        ValueError: an unknown name, a missing or malformed value, or one out of its range (the message lists
            the names and what each accepts).
    """
    if not isinstance(text, str):
        raise TypeError(f"kernel must be a string NAME:VALUE, got {text!r}")
    match = _SPEC.fullmatch(text.strip().lower())
    accepted = "; ".join(kernel_spec(n) for n in KERNELS)
    name = match["name"] if match is not None else None
    if match is None or name not in KERNELS or (match["value"] is None and name not in ("bema", "raw")):
        raise ValueError(f"kernel must be NAME:VALUE with NAME one of {accepted}, got {text!r}")
    parameters, what = KERNELS[name]
    if name == "raw" or (name == "bema" and match["value"] is None):
        if match["value"] is not None:
            raise ValueError(f"kernel raw takes no parameter ({what}), got {text!r}")
        return {"kernel": RAW_WEIGHTS if name == "raw" else bema_kernel(*BEMA_DEFAULTS)}
    values = []
    for part in match["value"].split(","):
        try:
            values.append(float(part))
        except ValueError:
            values.append(math.nan)
    if len(values) != len(parameters.split(",")) or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"kernel {name}: {parameters} must be {'numbers' if ',' in parameters else 'a number'} ({what}), got {text!r}"
        )
    value = values[0]
    try:
        if name == "bema":
            return {"kernel": bema_kernel(*values)}
        if name in _DECAYS:
            return {"kernel": decay_kernel(name, value)}
        if name == "power":
            PowerProfile.from_sigma_rel(value)
            return {"sigma_rel": value}
        if name == "ema":
            HalfLifeProfile(value)
            return {"half_life": value}
        return {"window": _fraction(value, "uniform fraction")}
    except ValueError:
        raise ValueError(f"kernel {name}: {what}; got {text!r}") from None


# ---------------------------------------------------------------------------------------------- the fit
def update_weights(profile: Profile, t_i: float, k: np.ndarray) -> np.ndarray:
    """The exact weight the tracked ``profile`` average gives update ``k`` (float64 array) after ``t_i`` updates."""
    n = float(t_i)
    inside = k <= n
    if isinstance(profile, PowerProfile):
        g = profile.gamma + 1.0
        kk = np.minimum(k, n)
        return np.where(inside, (kk / n) ** g - ((kk - 1.0) / n) ** g, 0.0)
    beta = 0.5 ** (1.0 / profile.half_life)
    age = np.maximum(n - k, 0.0)
    return np.where(inside, np.where(k == 1.0, beta ** (n - 1.0), (1.0 - beta) * beta**age), 0.0)


def kernel_fit(snapshots: Sequence[tuple[object, object]], kernel: Kernel, t: int) -> tuple[np.ndarray, float]:
    """Coefficients ``x`` (one per snapshot, summing to 1; 0 for those after ``t``) and the fit error for ``kernel``
    at ``t``, in the per-update measure of the module's docstring.

    Raises:
        ValueError: as :func:`~emakit.posthoc.profiles.solve_coefficients`, and a kernel whose weights are not
            finite and >= 0 with a positive sum.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
        raise ValueError(f"t must be an integer >= 1 (EMA updates), got {t!r}")
    sources, used, _ = usable_sources(snapshots, t)
    chosen = [sources[i] for i in used]
    w = kernel.masses(int(t))
    n = len(chosen)
    a, b = np.zeros((n, n)), np.zeros(n)
    kept = list(_blocks(chosen, int(t))) if 8 * n * int(t) <= _KEEP_BYTES else None  # else computed twice
    for k, m in kept if kept is not None else _blocks(chosen, int(t)):
        a += m @ m.T
        b += m @ w[int(k[0]) - 1 : int(k[-1])]
    x_used = solve_normal_equations(a, b, kernel, float(t), max(ti for _, ti in chosen))
    # The residual summed directly (a second pass): x A x - 2 x b + w w cancels badly when A is ill-conditioned.
    blocks = kept if kept is not None else _blocks(chosen, int(t))
    squared = sum(float(np.sum((x_used @ m - w[int(k[0]) - 1 : int(k[-1])]) ** 2)) for k, m in blocks)
    x = np.zeros(len(sources))
    x[used] = x_used
    return x, math.sqrt(squared / float(w @ w))


def _blocks(sources: Sequence[tuple[Profile, float]], t: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(updates k, weights m[i, k] of each source) over 1..t, :data:`CHUNK` updates at a time."""
    for start in range(0, t, CHUNK):
        k = np.arange(start + 1, min(start + CHUNK, t) + 1, dtype=np.float64)
        yield k, np.stack([update_weights(p, ti, k) for p, ti in sources])
