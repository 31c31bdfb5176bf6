"""EMA warm-up: a smoothing that ramps up over the first updates, the rule of timm and diffusers.

Early in training the weights move fast and an average with a long memory lags far behind them. The
warm-up caps each update's smoothing at ``1 - (1 + s / gamma) ** -power``, where ``s`` counts the blends
since the average started (1 for the first blend after the copy that starts it), so the average first
follows the weights closely and reaches the half-life's smoothing later. The cap is a pure function of the
update count, which the EMA saves, so a resumed run continues the ramp exactly.

The count matches timm's ``ModelEmaV3.get_decay`` (``s = step - update_after_step - 1``) and diffusers'
``EMAModel.get_decay`` (``s = optimization_step - update_after_step - 1``) when emakit's average starts
where theirs stops copying: ``ema_start=f"{update_after_step + 1}ba"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Warmup", "check_warmup"]


@dataclass(frozen=True)
class Warmup:
    """The warm-up ramp ``smoothing_s = 1 - (1 + s / gamma) ** -power`` (defaults as timm's and diffusers').

    Args:
        gamma: timm's ``warmup_gamma``, diffusers' ``inv_gamma``: the count scale; larger ramps more slowly.
        power: timm's ``warmup_power``, diffusers' ``power``. With gamma 1, 2/3 reaches smoothing 0.999 near
            update 31,600 (for runs of a million updates or more), 3/4 near update 10,000 (shorter runs).
    """

    gamma: float = 1.0
    power: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        for name in ("gamma", "power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Warmup {name} must be a finite number greater than 0, got {value!r}")

    def smoothing(self, blends: int) -> float:
        """The cap on the smoothing of blend number ``blends`` since the start (0 at the start: a copy)."""
        if blends <= 0:
            return 0.0
        return 1.0 - (1.0 + blends / self.gamma) ** -self.power


def check_warmup(warmup: Any, sigma_rel: Any, snapshot_folder: Any) -> Warmup | None:
    """``warmup`` (False/None, True for the defaults, or a :class:`Warmup`) as a Warmup or None."""
    if warmup is None or warmup is False:
        return None
    if warmup is True:
        warmup = Warmup()
    if not isinstance(warmup, Warmup):
        raise TypeError(f"warmup must be a bool or emakit.averaging.Warmup(gamma=..., power=...), got {warmup!r}")
    if sigma_rel is not None:
        raise ValueError("warmup applies to half_life / smoothing averages; a sigma_rel profile has its own ramp")
    if snapshot_folder is not None:
        raise ValueError(
            "warmup changes the averages' profiles, which post-hoc reconstruction from snapshots does not model: "
            "give warmup or snapshot_folder, not both"
        )
    return warmup
