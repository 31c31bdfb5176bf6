"""Post-hoc EMA (Karras et al., EDM2): track a few averages, snapshot them, reconstruct any other one later.

The maths, in the terms every module here uses:

- Time ``t`` counts EMA updates since the averages started (not optimizer steps: with an update every
  ``k`` steps, update ``t`` is step ``k t``, and a profile over updates is the same profile over steps).
- A power-function average weighs the past ``tau`` in ``[0, t]`` with ``p(tau) = (g+1) tau**g / t**(g+1)``; its
  relative width ``sigma_rel = sqrt((g+1) / ((g+2)**2 (g+3)))`` stays a fixed fraction of ``t``.
- It is tracked by ``avg <- beta_t avg + (1 - beta_t) w_t`` with ``beta_t = (1 - 1/t)**(g+1)`` (``beta_1 = 0``):
  after ``n`` updates, update ``k`` weighs ``(k**(g+1) - (k-1)**(g+1)) / n**(g+1)``.
- Snapshots ``i`` (profile ``p_i`` at ``t_i <= t*``) reconstruct a target ``p*`` at ``t*`` as ``sum_i x_i avg_i``,
  where ``x`` solves the least-squares problem ``<p_i, p_j> x = <p_i, p*>`` and is rescaled to sum to 1.
  Targets may be power profiles, constant half-lives, uniform windows, or any kernel over the updates
  (:mod:`~emakit.posthoc.targets`: WSM's decay-emulating merges, Python functions), and, from snapshots that
  hold the raw training weights, BEMA's output or the raw weights themselves.

Modules: :mod:`~emakit.posthoc.profiles` (the maths), :mod:`~emakit.engine.blend` (k averages updated
with one read of the weights), :mod:`~emakit.posthoc.snapshots` (the folder format),
:mod:`~emakit.posthoc.reconstruction` (streaming reconstruction), :mod:`~emakit.posthoc.targets` (kernels),
:mod:`~emakit.posthoc.sweep` (``sweep``: choose the best average by a metric; the function is not re-exported
here, where its name is the module's), :mod:`~emakit.posthoc.cli` (``emakit posthoc``).
Names are imported on first use, so ``emakit posthoc --help`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emakit._lazy import lazy_names

if TYPE_CHECKING:
    from emakit.engine.blend import blend_averages_
    from emakit.posthoc.profiles import (
        SIGMA_REL_MAX,
        HalfLifeProfile,
        PowerProfile,
        Profile,
        fit_error,
        gamma_to_sigma_rel,
        power_beta,
        power_inner,
        power_weights,
        profile_inner,
        sigma_rel_to_gamma,
        solve_coefficients,
    )
    from emakit.posthoc.reconstruction import ReconstructionPlan, execute_plan, plan_reconstruction, reconstruct
    from emakit.posthoc.snapshots import (
        SnapshotInfo,
        discard_snapshots_after,
        next_snapshot_index,
        read_snapshot_index,
        write_snapshot,
    )
    from emakit.posthoc.sweep import SweepError, SweepResult, sigma_rel_grid
    from emakit.posthoc.targets import (
        KERNELS,
        Kernel,
        RawTarget,
        bema_kernel,
        decay_kernel,
        kernel_from_function,
        parse_kernel,
    )

__all__ = [
    "KERNELS",
    "POOR_FIT",
    "SIGMA_REL_MAX",
    "UNREPRESENTABLE",
    "HalfLifeProfile",
    "Kernel",
    "PowerProfile",
    "Profile",
    "RawTarget",
    "ReconstructionPlan",
    "SnapshotInfo",
    "SweepError",
    "SweepResult",
    "bema_kernel",
    "blend_averages_",
    "decay_kernel",
    "discard_snapshots_after",
    "execute_plan",
    "fit_error",
    "gamma_to_sigma_rel",
    "kernel_from_function",
    "next_snapshot_index",
    "parse_kernel",
    "plan_reconstruction",
    "power_beta",
    "power_inner",
    "power_weights",
    "profile_inner",
    "read_snapshot_index",
    "reconstruct",
    "sigma_rel_grid",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "write_snapshot",
]

_LAZY: dict[str, str] = {
    "blend_averages_": "emakit.engine.blend",
    **dict.fromkeys(
        [
            "SIGMA_REL_MAX",
            "HalfLifeProfile",
            "PowerProfile",
            "Profile",
            "fit_error",
            "gamma_to_sigma_rel",
            "power_beta",
            "power_inner",
            "power_weights",
            "profile_inner",
            "sigma_rel_to_gamma",
            "solve_coefficients",
        ],
        "emakit.posthoc.profiles",
    ),
    **dict.fromkeys(
        ["ReconstructionPlan", "execute_plan", "plan_reconstruction", "reconstruct"], "emakit.posthoc.reconstruction"
    ),
    **dict.fromkeys(["SweepError", "SweepResult", "sigma_rel_grid"], "emakit.posthoc.sweep"),
    **dict.fromkeys(
        ["KERNELS", "Kernel", "RawTarget", "bema_kernel", "decay_kernel", "kernel_from_function", "parse_kernel"],
        "emakit.posthoc.targets",
    ),
    **dict.fromkeys(
        ["SnapshotInfo", "discard_snapshots_after", "next_snapshot_index", "read_snapshot_index", "write_snapshot"],
        "emakit.posthoc.snapshots",
    ),
}

#: Profile fit error above which a reconstruction warns that the snapshots represent its target poorly
#: (:func:`reconstruct` and ``emakit posthoc`` alike).
POOR_FIT = 0.05
#: Profile fit error at or above which a reconstruction is refused: the snapshots' best combination is no closer
#: to the target than the zero profile (whose error is exactly 1).
UNREPRESENTABLE = 1.0


__getattr__, __dir__ = lazy_names(__name__, __all__, _LAZY)
