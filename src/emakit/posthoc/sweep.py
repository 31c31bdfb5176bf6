"""Choose the best average by a metric: reconstruct each candidate target from a snapshot folder, evaluate it with the
user's function, keep a table, export the best.

Candidates are what :func:`~emakit.posthoc.reconstruction.plan_reconstruction` accepts as a ``kernel``: ``NAME:VALUE``
strings (``"power:0.05"``, ``"ema:500"``, ``"uniform:0.2"``, ``"cosine:0.2"``; see
:data:`~emakit.posthoc.targets.KERNELS`), :class:`~emakit.posthoc.targets.Kernel` objects or functions ``f(k, t)``;
``"tracked"`` stands for the averages the run tracked (exact at a snapshot's ``t``); ``"raw"`` for the raw training
weights at ``t`` and ``"bema"`` / ``"bema:RHO,GAMMA,KAPPA,ETA"`` for BEMA's output (snapshots written with
``snapshot_raw=True``); ``"window:T0:T1"`` or a ``(T0, T1)`` pair for the equal-weight average of the updates after
``T0`` up to ``T1`` (at its own end ``T1``, whatever ``t``). Every candidate is planned
before any is evaluated, so a target the snapshots cannot represent is refused before the first evaluation. Then
one at a time: reconstruct (one model's tensors in memory), call ``evaluate(weights)``, append a row, rewrite the
table (``sweep.csv`` and ``sweep.json``, atomically) and drop the weights. At the end: the plot (``sweep.png``)
and, with ``export``, the best candidate reconstructed again and written there. The plot is EDM2's figure: the
metric against ``sigma_rel`` on a log axis for the power-profile candidates, the others as labelled horizontal
lines; it needs matplotlib, and is left out, with a warning, when matplotlib is missing.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emakit.atomic import atomic_file, write_bytes
from emakit.posthoc import POOR_FIT
from emakit.posthoc.profiles import HalfLifeProfile
from emakit.posthoc.reconstruction import ReconstructionPlan, check_output, execute_plan, plan_reconstruction
from emakit.posthoc.snapshots import SnapshotInfo, read_snapshot_index
from emakit.posthoc.targets import Kernel, RawTarget, parse_kernel

__all__ = [
    "TABLE_FILES",
    "Evaluate",
    "SweepError",
    "SweepResult",
    "check_candidate",
    "load_metric",
    "plot_sweep",
    "sigma_rel_grid",
    "sweep",
]

#: What ``evaluate(weights)`` returns: a number, or named numbers (then ``metric=`` picks the one to choose by).
Evaluate = Callable[[dict[str, torch.Tensor]], "float | Mapping[str, float]"]
#: The files a sweep writes into its ``out`` folder.
TABLE_FILES = {"csv": "sweep.csv", "json": "sweep.json", "plot": "sweep.png"}
_COLUMNS = ("candidate", "target", "t", "fit_error", "snapshots_used")


@dataclasses.dataclass
class SweepResult:
    """The table of a sweep: one row per candidate evaluated, the best row and the files written."""

    rows: list[dict[str, Any]]
    metric: str
    goal: str
    best: dict[str, Any] | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the rows, the metric and goal, and the best candidate's label."""
        return {
            "format": "emakit.posthoc.sweep",
            "metric": self.metric,
            "goal": self.goal,
            "best": None if self.best is None else self.best["candidate"],
            "rows": self.rows,
        }


class SweepError(RuntimeError):
    """``evaluate`` raised: the message names the candidate; ``result`` holds the table so far (also on disk)."""

    def __init__(self, message: str, result: SweepResult) -> None:
        super().__init__(message)
        self.result = result


def sigma_rel_grid(low: float, high: float, count: int) -> list[float]:
    """``count`` values of sigma_rel from ``low`` to ``high``, evenly spaced on a log scale (3 significant digits)."""
    if not (0 < low <= high and isinstance(count, int) and count >= 1):
        raise ValueError(f"sigma_rel_grid needs 0 < low <= high and count >= 1, got {low!r}, {high!r}, {count!r}")
    step = 0.0 if count == 1 else math.log(high / low) / (count - 1)
    return sorted({float(f"{low * math.exp(i * step):.3g}") for i in range(count)})


def _label(candidate: object) -> str:
    if isinstance(candidate, str):
        return candidate
    if isinstance(candidate, (Kernel, RawTarget)):
        return str(candidate)
    return str(getattr(candidate, "__qualname__", None) or candidate)


def _window_pair(candidate: object) -> tuple[int, int] | None:
    """A window candidate (``"window:T0:T1"`` or a ``(T0, T1)`` pair) as the pair; None for other candidates."""
    if isinstance(candidate, str) and candidate.strip().lower().startswith("window:"):
        parts = candidate.strip().split(":")[1:]
        try:
            pair = (int(parts[0]), int(parts[1])) if len(parts) == 2 else None
        except ValueError:
            pair = None
    elif isinstance(candidate, tuple):
        pair = candidate if len(candidate) == 2 and all(isinstance(v, int) for v in candidate) else None
    else:
        return None
    if pair is None or not 0 <= pair[0] < pair[1] or isinstance(pair[0], bool) or isinstance(pair[1], bool):
        raise ValueError(
            f"a window candidate is 'window:T0:T1' or (T0, T1) with 0 <= T0 < T1 updates, got {candidate!r}"
        )
    return pair


def check_candidate(text: str) -> None:
    """ValueError naming what is accepted if ``text`` is not a candidate: ``tracked``, ``window:T0:T1`` or a named
    kernel (:func:`~emakit.posthoc.targets.parse_kernel`); what the snapshots hold is checked by :func:`sweep`."""
    if text != "tracked" and _window_pair(text) is None:
        parse_kernel(text)


def _expand(candidates: Sequence[object], index: Sequence[SnapshotInfo]) -> list[tuple[str, object]]:
    """(label, kernel argument or window pair) per candidate; ``"tracked"`` becomes the tracked profiles."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError(
            f"candidates must be a non-empty list of targets ('power:0.05', 'cosine:0.2', ...), got {candidates!r}"
        )
    out: list[tuple[str, object]] = []
    for candidate in candidates:
        pair = _window_pair(candidate)
        if candidate == "tracked":
            for profile in index[-1].profiles:
                spec = (
                    f"ema:{profile.half_life!r}"
                    if isinstance(profile, HalfLifeProfile)
                    else f"power:{profile.sigma_rel!r}"
                )
                out.append((f"tracked {spec}", spec))
        elif pair is not None:
            out.append((f"window:{pair[0]}:{pair[1]}", pair))
        else:
            out.append((_label(candidate), candidate))
    return out


def _plan_all(
    index: Sequence[SnapshotInfo], expanded: list[tuple[str, object]], t: int | None
) -> list[ReconstructionPlan]:
    plans, refused = [], []
    for label, kernel in expanded:
        try:
            if isinstance(kernel, tuple):
                plans.append(plan_reconstruction(index, window=kernel))  # at its own end
            else:
                plans.append(plan_reconstruction(index, kernel=kernel, t=t))  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            refused.append(f"{label}: {e}")
    if refused:
        raise ValueError(
            f"{len(refused)} of {len(expanded)} candidates cannot be reconstructed:\n  " + "\n  ".join(refused)
        )
    return plans


def _metrics(value: object, metric: str | None, label: str) -> tuple[dict[str, float], str]:
    numbers_ = {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else {metric or "metric": value}
    bad = {k: v for k, v in numbers_.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)}
    if bad or not numbers_:
        raise TypeError(f"evaluate must return a number or a mapping of names to numbers, got {value!r} for {label}")
    chosen = metric if metric is not None else next(iter(numbers_))
    if chosen not in numbers_:
        raise KeyError(f"evaluate returned no {chosen!r} (metric=) for {label}; it returned {sorted(numbers_)}")
    return {k: float(v) for k, v in numbers_.items()}, chosen  # type: ignore[arg-type]


def _best(rows: list[dict[str, Any]], metric: str, goal: str) -> dict[str, Any] | None:
    scored = [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    if not scored:
        return None
    sign = -1.0 if goal == "max" else 1.0
    return min(scored, key=lambda r: sign * r[metric])  # the first of equals


def _write_atomic(path: Path, text: str) -> None:
    write_bytes(path, text.encode(), overwrite=True)  # the sweep's own table, rewritten after each candidate


def _write_table(result: SweepResult, folder: Path) -> None:
    columns: list[str] = []
    for row in result.rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    _write_atomic(folder / TABLE_FILES["csv"], buffer.getvalue())
    _write_atomic(folder / TABLE_FILES["json"], json.dumps(result.to_json(), indent=2) + "\n")
    result.files.update(csv=folder / TABLE_FILES["csv"], json=folder / TABLE_FILES["json"])


def _check_folder(out: str | os.PathLike[str], overwrite: bool) -> Path:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; give a folder for the sweep's table and plot")
    taken = [name for name in TABLE_FILES.values() if (folder / name).exists()]
    if taken and overwrite is not True:
        raise FileExistsError(
            f"out={str(out)!r} already holds {', '.join(taken)}: pass overwrite=True (emakit posthoc: --force) to "
            "replace them, or choose another folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sweep(
    snapshots: str | os.PathLike[str] | Sequence[SnapshotInfo],
    evaluate: Evaluate,
    candidates: Sequence[object],
    *,
    t: int | None = None,
    metric: str | None = None,
    goal: str = "min",
    out: str | os.PathLike[str] | None = None,
    export: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    plot: bool = True,
    progress: bool | Callable[[str], None] = True,
    dtype: torch.dtype = torch.float32,
) -> SweepResult:
    """Reconstruct each candidate at ``t`` (default: the last snapshot), evaluate it, and choose the best.

    ``evaluate(weights)`` gets the reconstructed tensors by canonical name (load them with
    ``model.load_state_dict``) and returns a number, or named numbers with ``metric`` the one to choose by (default:
    the first); ``goal`` is ``"min"`` (a loss) or ``"max"`` (an accuracy); the first of equal values wins. With
    ``out`` (a folder), the table is rewritten there after every candidate and plotted at the end (``plot``;
    needs matplotlib); with ``export``, the best is written there (a safetensors file). Existing files are
    replaced only with ``overwrite=True``. ``progress``: a line per candidate on stderr, or a function of the line.

    Raises:
        ValueError: bad arguments, or candidates the snapshots cannot represent (all listed; nothing evaluated).
        SweepError: ``evaluate`` raised or returned no number; the message names the candidate, ``result``
            holds the rows before it (the table on disk too), and the cause is chained.
    """
    if goal not in ("min", "max"):
        raise ValueError(f"goal must be 'min' (a loss) or 'max' (an accuracy), got {goal!r}")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function of the weights (a dict of tensors), got {evaluate!r}")
    index = read_snapshot_index(snapshots) if isinstance(snapshots, (str, os.PathLike)) else list(snapshots)
    expanded = _expand(candidates, index)
    plans = _plan_all(index, expanded, t)
    folder = _check_folder(out, overwrite) if out is not None else None
    if export is not None:
        check_output(plans[0], export, overwrite)
    say: Callable[[str], None] = (
        progress
        if callable(progress)
        else (lambda line: print(line, file=sys.stderr, flush=True))
        if progress
        else (lambda _: None)
    )
    result = SweepResult(rows=[], metric=metric or "metric", goal=goal)
    best_plan: ReconstructionPlan | None = None
    for i, ((label, _), plan) in enumerate(zip(expanded, plans, strict=True), start=1):
        start = time.perf_counter()
        row: dict[str, Any] = {
            "candidate": label,
            "target": plan.target.to_dict(),
            "t": plan.t,
            "fit_error": plan.fit_error,
            "snapshots_used": len({info.index for info, _, _ in plan.terms}),
        }
        weights = execute_plan(plan, dtype=dtype)
        try:
            values, chosen = _metrics(evaluate(weights), metric, label)
        except Exception as e:  # the user's function: any failure is reported with the candidate and the table so far
            del weights
            if folder is not None:
                _write_table(result, folder)
            where = f"; the table so far is in {folder / TABLE_FILES['csv']}" if folder is not None else ""
            raise SweepError(
                f"evaluate raised {type(e).__name__} on candidate {i}/{len(plans)} ({label}): {e}; "
                f"{len(result.rows)} candidates were evaluated before it (SweepError.result){where}",
                result,
            ) from e
        del weights
        result.metric = chosen
        row.update(values)
        row["seconds"] = round(time.perf_counter() - start, 4)
        result.rows.append(row)
        best = _best(result.rows, chosen, goal)
        if best is row:
            best_plan = plan
        result.best = best
        if folder is not None:
            _write_table(result, folder)
        poor = " (poor fit)" if plan.fit_error > POOR_FIT else ""
        say(f"[{i}/{len(plans)}] {label}: {chosen} {values[chosen]:.6g}, fit error {100 * plan.fit_error:.3g}%{poor}")
    if folder is not None and plot:
        try:
            result.files["plot"] = plot_sweep(result, folder / TABLE_FILES["plot"])
        except ImportError:
            warnings.warn(
                f"matplotlib is not installed: the sweep wrote its table to {str(folder)!r} but no "
                f"{TABLE_FILES['plot']} (pip install matplotlib, or pass plot=False)",
                stacklevel=2,
            )
    if export is not None and best_plan is not None:
        execute_plan(best_plan, out=export, dtype=dtype, overwrite=overwrite)
        result.files["export"] = Path(export)
    return result


def _sigma_rel(row: Mapping[str, Any]) -> float | None:
    target = row.get("target")
    return float(target["sigma_rel"]) if isinstance(target, Mapping) and target.get("kind") == "power" else None


def plot_sweep(result: SweepResult, path: Path) -> Path:
    """EDM2's figure: the metric against ``sigma_rel`` (log axis) for the power-profile candidates, each other
    candidate a labelled horizontal line; without power candidates, the metric against the candidates in order.
    The best is starred; hollow dots: a fit error above :data:`~emakit.posthoc.POOR_FIT`.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in result.rows if result.metric in r]
    powers = sorted(((s, r) for r in rows if (s := _sigma_rel(r)) is not None), key=lambda pair: pair[0])
    others = [r for r in rows if _sigma_rel(r) is None]
    blue = "#1f5fa8"
    if powers:
        fig, ax = plt.subplots(figsize=(7.0, 4.4), constrained_layout=True)
        xs, ys = [s for s, _ in powers], [r[result.metric] for _, r in powers]
        ax.plot(xs, ys, color=blue, lw=1.2, zorder=1, label="power profiles")
        for x, (_, r) in zip(xs, powers, strict=True):
            good = r["fit_error"] <= POOR_FIT
            ax.scatter([x], [r[result.metric]], s=36, zorder=2, color=blue if good else "white", edgecolors=blue)
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)  # a margin, and a range even for one sigma_rel
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("sigma_rel (log scale)")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, r in enumerate(others):
            style = "--" if r["fit_error"] <= POOR_FIT else ":"
            ax.axhline(r[result.metric], ls=style, lw=1, color=colors[(i + 1) % len(colors)], label=r["candidate"])
        if result.best is not None and (best := _sigma_rel(result.best)) is not None:
            ax.scatter([best], [result.best[result.metric]], marker="*", s=260, color="#2a9d3a", zorder=3)
        title = "post-hoc candidates against sigma_rel\nlines: the other candidates"
    else:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2), constrained_layout=True)
        ax.plot(range(len(rows)), [r[result.metric] for r in rows], color=blue, lw=1, zorder=1)
        for x, r in enumerate(rows):
            good = r["fit_error"] <= POOR_FIT
            ax.scatter([x], [r[result.metric]], s=36, zorder=2, color=blue if good else "white", edgecolors=blue)
        if result.best is not None:
            x = rows.index(result.best)
            ax.scatter([x], [rows[x][result.metric]], marker="*", s=260, color="#2a9d3a", zorder=3)
        ax.set_xticks(range(len(rows)), [r["candidate"] for r in rows], rotation=60, ha="right", fontsize=8)
        title = "post-hoc candidates"
    if result.best is not None:
        ax.plot([], [], "*", color="#2a9d3a", ms=12, label=f"best: {result.best['candidate']}")
    ax.legend(fontsize=8)
    ax.set_ylabel(f"{result.metric} ({'lower' if result.goal == 'min' else 'higher'} is better)")
    ax.set_title(f"{title}; hollow or dotted: fit error above {POOR_FIT:.0%}", fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
    try:
        with atomic_file(path, overwrite=True) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def load_metric(text: str) -> Evaluate:
    """The function ``MODULE:FUNCTION`` (an importable module, or a ``path/to/file.py``) names.

    Raises:
        ValueError: not ``MODULE:FUNCTION``, the module or function not found, or not callable.
    """
    module_name, sep, function = text.rpartition(":")
    if not sep or not module_name or not function.isidentifier():
        raise ValueError(f"--metric must be MODULE:FUNCTION (or path/to/file.py:FUNCTION), got {text!r}")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current folder
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--metric {text!r}: cannot import {module_name!r}: {e}") from None
    value = getattr(module, function, None)
    if not callable(value):
        raise ValueError(f"--metric {text!r}: {module_name!r} has no function {function!r}")
    return value
