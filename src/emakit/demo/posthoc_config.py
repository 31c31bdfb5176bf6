"""The post-hoc demo's settings: its files and constants, the sigma_rel sweep, and :class:`PosthocDemoConfig`
with its checks (each error names the command-line option). Imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from emakit.demo.config import DemoConfig, OptionError
from emakit.posthoc import POOR_FIT  # a profile fit error above this: the snapshots represent a target poorly

__all__ = [
    "CHECK_TOLERANCE",
    "PLOT_FILE",
    "POOR_FIT",
    "SNAPSHOT_DIR",
    "SUMMARY_FILE",
    "TARGET_SNAPSHOTS",
    "TRACKED_SIGMA_REL",
    "PosthocDemoConfig",
    "check_config",
    "default_sweep",
]

SNAPSHOT_DIR = "snapshots"
SUMMARY_FILE = "posthoc.json"
PLOT_FILE = "posthoc.png"
#: The profiles tracked during training: EDM2's pair, narrow and wide.
TRACKED_SIGMA_REL = (0.05, 0.10)
#: Snapshots written over a run (about: the interval is rounded to whole batches).
TARGET_SNAPSHOTS = 30
#: The reconstruction check passes when rebuilding a tracked profile misses it by at most this fraction of the
#: distance between the two tracked averages.
CHECK_TOLERANCE = 0.01

_DEMO = DemoConfig(out=Path("."))
_SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)


def default_sweep() -> tuple[float, ...]:
    """15 values from 0.02 to 0.25, evenly spaced on a log scale (3 significant digits), and the tracked two."""
    count, low, high = 15, 0.02, 0.25
    values = {float(f"{low * (high / low) ** (i / (count - 1)):.3g}") for i in range(count)}
    return tuple(sorted(values | set(TRACKED_SIGMA_REL)))


@dataclass
class PosthocDemoConfig:
    """Settings of the post-hoc demo. Training defaults are ``emakit demo``'s (:class:`~emakit.demo.config.DemoConfig`),
    so with the same seed the training weights follow the same trajectory."""

    out: Path
    epochs: int = _DEMO.epochs
    seed: int = _DEMO.seed
    threads: int | None = _DEMO.threads
    plot: bool = True
    lr: float = _DEMO.lr
    batch_size: int = _DEMO.batch_size
    #: the sigma_rel values rebuilt and evaluated after training (the tracked ones are always added)
    sweep: tuple[float, ...] = field(default_factory=default_sweep)
    snapshots: int = TARGET_SNAPSHOTS


def check_config(config: PosthocDemoConfig) -> PosthocDemoConfig:
    """Validate every setting (naming the command-line option) before anything is trained or written."""

    def positive_int(option: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise OptionError(option, f"must be a positive integer, got {value!r}")

    positive_int("--epochs", config.epochs)
    positive_int("batch_size", config.batch_size)
    positive_int("snapshots", config.snapshots)
    if config.batch_size < 2:
        raise OptionError("batch_size", f"must be at least 2 (BatchNorm needs 2 samples), got {config.batch_size}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise OptionError("--seed", f"must be a non-negative integer, got {config.seed!r}")
    if config.threads is not None:
        positive_int("--threads", config.threads)
    if (
        isinstance(config.lr, bool)
        or not isinstance(config.lr, (int, float))
        or not (math.isfinite(config.lr) and config.lr > 0)
    ):
        raise OptionError("lr", f"must be a positive finite number, got {config.lr!r}")
    sweep = tuple(config.sweep)
    bad = [
        s
        for s in sweep
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 < float(s) < _SIGMA_REL_MAX)
    ]
    if not sweep or bad:
        raise OptionError(
            "sweep",
            f"must be one or more numbers in (0, 1/sqrt(12) = {_SIGMA_REL_MAX:.6f}), got {list(bad) if bad else []!r}",
        )
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise OptionError("--out", f"{str(out)!r} exists and is not a folder")
    if (out / SUMMARY_FILE).exists() or (out / SNAPSHOT_DIR).exists():
        raise OptionError(
            "--out",
            f"{str(out)!r} already holds a post-hoc run ({SUMMARY_FILE} or {SNAPSHOT_DIR}/); snapshots of two "
            "runs cannot share a folder: choose another or delete it",
        )
    return config
