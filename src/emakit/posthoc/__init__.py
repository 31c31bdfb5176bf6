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
  Targets may be power profiles or constant half-lives.

Modules: :mod:`~emakit.posthoc.profiles` (the maths), :mod:`~emakit.engine.blend` (k averages updated
with one read of the weights; also as :mod:`~emakit.posthoc.kernels`), :mod:`~emakit.posthoc.snapshots` (the folder format),
:mod:`~emakit.posthoc.reconstruction` (streaming reconstruction), :mod:`~emakit.posthoc.cli` (``emakit posthoc``).
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

__all__ = [
    "POOR_FIT",
    "SIGMA_REL_MAX",
    "HalfLifeProfile",
    "PowerProfile",
    "Profile",
    "ReconstructionPlan",
    "SnapshotInfo",
    "blend_averages_",
    "discard_snapshots_after",
    "execute_plan",
    "fit_error",
    "gamma_to_sigma_rel",
    "next_snapshot_index",
    "plan_reconstruction",
    "power_beta",
    "power_inner",
    "power_weights",
    "profile_inner",
    "read_snapshot_index",
    "reconstruct",
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
    **dict.fromkeys(
        ["SnapshotInfo", "discard_snapshots_after", "next_snapshot_index", "read_snapshot_index", "write_snapshot"],
        "emakit.posthoc.snapshots",
    ),
}

#: Profile fit error above which a reconstruction warns that the snapshots represent its target poorly
#: (:func:`reconstruct` and ``emakit posthoc`` alike).
POOR_FIT = 0.05


__getattr__, __dir__ = lazy_names(__name__, __all__, _LAZY)
