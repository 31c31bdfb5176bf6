"""``emakit demo --posthoc``: choose the EMA length after training, on the digits demo.

The run trains the demo's model exactly as ``emakit demo`` does (same data, split, model, SGD settings and
seed, through emakit's :class:`~emakit.Trainer`), but its EMA tracks two power-function profiles,
``sigma_rel`` 0.05 and 0.10 (EDM2's post-hoc EMA), and writes both to ``<out>/snapshots/`` about 30 times
over the run. After training it rebuilds the average of every ``sigma_rel`` of a sweep from those snapshots
(:mod:`emakit.posthoc`), evaluates each on the validation split, and writes:

- ``posthoc.json``: every ``sigma_rel`` with its validation accuracy, loss and profile fit error; the two
  tracked averages evaluated directly; the best one; the number of snapshots; and the reconstruction check
  (the tracked profiles rebuilt at the last snapshot against the tracked averages' final values, relative
  to the distance between the two);
- ``posthoc.png``: accuracy and loss against ``sigma_rel`` (log axis), the tracked and the best marked.

:func:`main` is the command line (``emakit demo --posthoc --help``); :func:`run_posthoc_demo` does the work.
Torch, matplotlib and the training code are imported when a run starts, not when this module is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from emakit.demo.config import DemoConfig, OptionError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "PosthocDemoConfig",
    "build_parser",
    "default_sweep",
    "format_table",
    "main",
    "plot_sweep",
    "run_posthoc_demo",
]

PROG = "emakit demo --posthoc"
SNAPSHOT_DIR = "snapshots"
SUMMARY_FILE = "posthoc.json"
PLOT_FILE = "posthoc.png"
#: The profiles tracked during training: EDM2's pair, narrow and wide.
TRACKED_SIGMA_REL = (0.05, 0.10)
#: Snapshots written over a run (about: the interval is rounded to whole batches).
TARGET_SNAPSHOTS = 30
#: A profile fit error above this means the snapshots cannot represent that sigma_rel well.
POOR_FIT = 0.05
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


def _check_config(config: PosthocDemoConfig) -> PosthocDemoConfig:
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


# ---------------------------------------------------------------------------------------------- the run


def _floating_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two state dicts over their floating tensors (float64)."""
    import torch

    names = [n for n, v in a.items() if v.is_floating_point()]
    if not names:
        return 0.0
    return float(torch.cat([(a[n].double() - b[n].double()).flatten() for n in names]).norm())


def _metrics(values: dict[str, float]) -> dict[str, float]:
    return {"accuracy": float(values["eval/accuracy"]), "loss": float(values["eval/loss"])}


def _holdout(index: Sequence[Any], j: int, final: dict[str, torch.Tensor], distance: float) -> dict[str, float]:
    """Rebuild tracked average ``j`` at the last snapshot *without that snapshot's copy of it*.

    At a snapshot's own ``t`` the least squares simply picks that snapshot (coefficient 1), so the check
    against the final values is exact by construction. Leaving the copy out makes the other snapshots do the
    work (the other profile's final copy and all earlier ones), as they must for any ``sigma_rel`` not tracked:
    the error, relative to the distance between the two tracked averages, shows how well they can.
    """
    from emakit.posthoc import ReconstructionPlan, execute_plan, fit_error, solve_coefficients

    last = index[-1]
    pairs = [(info, k) for info in index for k in range(len(info.profiles)) if not (info is last and k == j)]
    sources = [(info.profiles[k], info.t) for info, k in pairs]
    target = last.profiles[j]
    x = solve_coefficients(sources, target, last.t)
    error = fit_error(sources, x.tolist(), target, last.t)
    terms = tuple((info, k, float(c)) for (info, k), c in zip(pairs, x, strict=True) if c != 0.0)
    plan = ReconstructionPlan(target, last.t, terms, error, last, tuple(index))
    rebuilt = execute_plan(plan)
    return {
        "relative_error": _floating_distance(rebuilt, final) / distance if distance > 0 else 0.0,
        "fit_error": float(error),
    }


def run_posthoc_demo(config: PosthocDemoConfig) -> dict[str, Any]:
    """Train with a two-profile EMA writing snapshots, rebuild and evaluate every ``sigma_rel`` of the sweep.

    Writes ``snapshots/``, ``posthoc.json`` and (with ``config.plot``) ``posthoc.png`` into ``config.out``,
    and returns the summary that ``posthoc.json`` holds, plus ``files`` (the paths written).

    Raises:
        OptionError: a setting is invalid (``option`` names it); nothing has been written then.
    """
    _check_config(config)
    import torch

    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        summary = _run(config, start)
    finally:
        torch.set_num_threads(threads_before)
    return summary


def _run(config: PosthocDemoConfig, start: float) -> dict[str, Any]:
    import torch
    from torch import nn

    from emakit.algorithms import EMA
    from emakit.demo.data import load_data
    from emakit.demo.model import build_model
    from emakit.demo.run import build_loaders
    from emakit.posthoc import execute_plan, plan_reconstruction, read_snapshot_index
    from emakit.trainer import Trainer, evaluate

    out = Path(config.out)
    folder = out / SNAPSHOT_DIR
    data = load_data()
    batches_per_epoch = len(data.y_train) // config.batch_size
    total = batches_per_epoch * config.epochs
    interval = max(1, math.ceil(total / config.snapshots))
    out.mkdir(parents=True, exist_ok=True)

    # The same model, loaders, optimizer and seeding as emakit.demo.run._train; no evaluation during training.
    torch.manual_seed(config.seed)
    model: nn.Module = build_model(data.input_shape, data.num_classes)
    train_loader, val_loader = build_loaders(data, config.batch_size, config.seed)
    loss_fn = nn.functional.cross_entropy
    ema = EMA(
        sigma_rel=list(TRACKED_SIGMA_REL),
        snapshot_interval=f"{interval}ba",
        snapshot_folder=folder,
        flatten_model=True,
    )
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        max_duration=f"{config.epochs}ep",
        algorithms=[ema],
        optimizers=torch.optim.SGD(model.parameters(), lr=config.lr),
        loss_fn=loss_fn,
        device="cpu",
        seed=config.seed,
        progress_bar=False,
    )
    trainer.fit()
    if total % interval:  # the last batch was not a snapshot batch: snapshot the final averages too
        ema.write_snapshot()
    train_s = time.perf_counter() - start

    # The trained model, and the tracked averages swapped into it: evaluated directly, not rebuilt.
    trained = trainer.state.model
    raw = _metrics(evaluate(trained, val_loader, loss_fn))
    finals: list[dict[str, torch.Tensor]] = []
    direct: list[dict[str, float]] = []
    for j in range(len(TRACKED_SIGMA_REL)):
        ema.eval_average = j
        finals.append({n: v.detach().clone() for n, v in ema.ema_tensors.items()})
        with ema.average_parameters():
            direct.append(_metrics(evaluate(trained, val_loader, loss_fn)))
    ema.eval_average = 0

    # Rebuild every sigma_rel of the sweep at the last snapshot and evaluate it in a fresh copy of the model.
    sweep_start = time.perf_counter()
    index = read_snapshot_index(folder)
    with torch.random.fork_rng():
        evaluated = build_model(data.input_shape, data.num_classes)
    sigmas = sorted({float(s) for s in config.sweep} | set(TRACKED_SIGMA_REL))
    rows: list[dict[str, Any]] = []
    rebuilt_tracked: dict[float, dict[str, torch.Tensor]] = {}
    for sigma in sigmas:
        plan = plan_reconstruction(index, sigma_rel=sigma)
        weights = execute_plan(plan)  # what emakit.posthoc.reconstruct(folder, sigma_rel=sigma) returns
        evaluated.load_state_dict(weights)
        metrics = _metrics(evaluate(evaluated, val_loader, loss_fn))
        tracked = sigma in TRACKED_SIGMA_REL
        if tracked:
            rebuilt_tracked[sigma] = weights
        rows.append(
            {
                "sigma_rel": sigma,
                **metrics,
                "fit_error": float(plan.fit_error),
                "snapshots_used": len({info.index for info, _, _ in plan.terms}),
                "tracked": tracked,
            }
        )
    sweep_s = time.perf_counter() - sweep_start

    # The check: the tracked profiles rebuilt at the last snapshot against the tracked averages' final values.
    distance = _floating_distance(finals[0], finals[1])
    tracked_rows = []
    for j, sigma in enumerate(TRACKED_SIGMA_REL):
        row = next(r for r in rows if r["sigma_rel"] == sigma)
        error = _floating_distance(rebuilt_tracked[sigma], finals[j]) / distance if distance > 0 else 0.0
        holdout = _holdout(index, j, finals[j], distance)
        tracked_rows.append(
            {
                "sigma_rel": sigma,
                "accuracy": direct[j]["accuracy"],
                "loss": direct[j]["loss"],
                "reconstructed_accuracy": row["accuracy"],
                "reconstructed_loss": row["loss"],
                "reconstruction_error": error,
                "holdout_error": holdout["relative_error"],
                "holdout_fit_error": holdout["fit_error"],
            }
        )
    worst = max(r["reconstruction_error"] for r in tracked_rows)
    # Ties in accuracy (it moves in steps of one validation image) go to the lower loss.
    best = max(rows, key=lambda r: (r["accuracy"], -r["loss"]))
    last = index[-1]
    summary: dict[str, Any] = {
        "format": "emakit.demo.posthoc",
        "data": data.source,
        "validation_samples": len(data.y_val),
        "total_batches": trainer.state.timestamp.batch,
        "ema_updates": last.t,
        "tracked_sigma_rel": list(TRACKED_SIGMA_REL),
        "snapshot_interval": f"{interval}ba",
        "num_snapshots": len(index),
        "snapshot_folder": SNAPSHOT_DIR,
        "sweep": rows,
        "tracked": tracked_rows,
        "best": {k: best[k] for k in ("sigma_rel", "accuracy", "loss", "fit_error")},
        "raw_final": raw,
        "reconstruction_check": {
            "t": last.t,
            "distance_between_tracked": distance,
            "max_relative_error": worst,
            "tolerance": CHECK_TOLERANCE,
            "ok": worst <= CHECK_TOLERANCE,
            "max_holdout_error": max(r["holdout_error"] for r in tracked_rows),
        },
        "poor_fit_threshold": POOR_FIT,
    }
    files = {"snapshots": folder, "summary": out / SUMMARY_FILE}
    if config.plot:
        files["plot"] = plot_sweep(summary, out / PLOT_FILE, title=_title(config, summary))
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    summary["config"]["sweep"] = list(config.sweep)
    summary["seconds"] = {
        "train": round(train_s, 2),
        "sweep": round(sweep_s, 2),
        "total": round(time.perf_counter() - start, 2),
    }
    text = json.dumps(summary, indent=2) + "\n"
    tmp = files["summary"].with_name(f".{SUMMARY_FILE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(files["summary"])
    summary["files"] = {k: str(v) for k, v in files.items()}
    return summary


def _title(config: PosthocDemoConfig, summary: dict[str, Any]) -> str:
    return (
        f"{summary['data']}: SGD lr={config.lr:g}, batch {config.batch_size}, {summary['total_batches']} batches, "
        f"seed {config.seed}; {summary['num_snapshots']} snapshots of sigma_rel "
        f"{' and '.join(f'{s:g}' for s in summary['tracked_sigma_rel'])}"
    )


# ---------------------------------------------------------------------------------------------- output


def plot_sweep(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Draw validation accuracy (left) and loss (right) against ``sigma_rel`` (log axis); save to ``path``.

    Filled dots are averages the snapshots represent well, hollow ones those whose profile fit error is above
    :data:`POOR_FIT`. The tracked profiles are marked with dotted lines and their directly evaluated values
    (diamonds, which the rebuilt dots should sit in), the best with a star and a label; the raw training
    weights' final accuracy is the dashed line (their loss, far above, is written in the loss panel).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = summary["sweep"]
    if not rows:
        raise ValueError("no sweep results to plot")
    color, tracked_color, best_color = "#1f5fa8", "#e07b39", "#2a9d3a"
    sigma = [r["sigma_rel"] for r in rows]
    good = [r["fit_error"] <= POOR_FIT for r in rows]
    total = summary["total_batches"]
    best, raw = summary["best"], summary["raw_final"]
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for ax, key, scale, label in (
        (axes[0], "accuracy", 100.0, "validation accuracy (%)"),
        (axes[1], "loss", 1.0, "validation loss (cross-entropy)"),
    ):
        values = [scale * r[key] for r in rows]
        ax.plot(sigma, values, color=color, lw=1.5, zorder=2)
        ax.scatter(
            [s for s, g in zip(sigma, good, strict=True) if g],
            [v for v, g in zip(values, good, strict=True) if g],
            color=color,
            s=30,
            zorder=3,
            label="rebuilt from the snapshots",
        )
        poor = [(s, v) for s, v, g in zip(sigma, values, good, strict=True) if not g]
        if poor:
            ax.scatter(
                *zip(*poor, strict=True),
                facecolors="white",
                edgecolors=color,
                s=30,
                zorder=3,
                label=f"rebuilt, profile fit error > {POOR_FIT:.0%}",
            )
        for i, tracked in enumerate(summary["tracked"]):
            ax.axvline(tracked["sigma_rel"], color=tracked_color, ls=":", lw=1.2, zorder=1)
            ax.scatter(
                [tracked["sigma_rel"]],
                [scale * tracked[key]],
                marker="D",
                s=80,
                facecolors="none",
                edgecolors=tracked_color,
                lw=1.5,
                zorder=4,
                label="tracked in training, evaluated directly" if i == 0 else None,
            )
            ax.annotate(
                f"tracked {tracked['sigma_rel']:g}",
                xy=(tracked["sigma_rel"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -4),
                textcoords="offset points",
                fontsize=8,
                color=tracked_color,
                va="top",
            )
        ax.scatter([best["sigma_rel"]], [scale * best[key]], marker="*", s=240, color=best_color, zorder=5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25]))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(sigma) / 1.08, max(sigma) * 1.08)
        ax.set_xlabel("sigma_rel: width of the average as a fraction of training (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda s: s * total, lambda b: b / total))
        top.xaxis.set_major_locator(FixedLocator([10, 20, 30, 50, 70, 100, 150, 200, 300, 500, 1000]))
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
        top.xaxis.set_minor_locator(NullLocator())
        top.set_xlabel(f"the same width in batches at the end (sigma_rel x {total})")
    axes[0].axhline(100 * raw["accuracy"], color="0.55", ls="--", lw=1, label="raw training weights at the end")
    axes[0].annotate(
        f"best: sigma_rel {best['sigma_rel']:.3g}\n{100 * best['accuracy']:.2f}%, loss {best['loss']:.4f}",
        xy=(best["sigma_rel"], 100 * best["accuracy"]),
        xytext=(-40, -75),
        textcoords="offset points",
        ha="right",
        fontsize=9,
        color=best_color,
        arrowprops={"arrowstyle": "->", "color": best_color},
    )
    step = 100.0 / summary["validation_samples"]
    axes[0].text(
        0.02,
        0.3,
        f"one validation image = {step:.2f} percentage points",
        transform=axes[0].transAxes,
        fontsize=8,
        color="0.4",
    )
    axes[1].text(
        0.02,
        0.03,
        f"raw training weights at the end: loss {raw['loss']:.4f}",
        transform=axes[1].transAxes,
        fontsize=8,
        color="0.4",
    )
    axes[0].legend(loc="center left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def format_table(summary: dict[str, Any]) -> str:
    """The sweep as a text table (one line per sigma_rel), with the best, the tracked and the check."""
    lines = [f"  {'sigma_rel':>9}  {'accuracy':>9}  {'loss':>7}  {'fit error':>9}"]
    best = summary["best"]["sigma_rel"]
    for r in summary["sweep"]:
        marks = []
        if r["tracked"]:
            marks.append("tracked")
        if r["sigma_rel"] == best:
            marks.append("best")
        if r["fit_error"] > POOR_FIT:
            marks.append("poor fit")
        lines.append(
            f"  {r['sigma_rel']:>9.4g}  {100 * r['accuracy']:>8.2f}%  {r['loss']:>7.4f}  {100 * r['fit_error']:>8.3f}%"
            f"  {', '.join(marks)}"
        )
    raw = summary["raw_final"]
    check = summary["reconstruction_check"]
    lines += [
        f"  raw training weights at the end: {100 * raw['accuracy']:.2f}%, loss {raw['loss']:.4f}",
        f"  {summary['num_snapshots']} snapshots, every {summary['snapshot_interval']}. The tracked profiles rebuilt at "
        "the last one, against their final values",
        f"  (error relative to the distance between the two): {100 * check['max_relative_error']:.2g}% "
        f"({'within' if check['ok'] else 'ABOVE'} the {100 * check['tolerance']:g}% check); without that snapshot's "
        "own copy: " + ", ".join(f"{r['sigma_rel']:g} {100 * r['holdout_error']:.2g}%" for r in summary["tracked"]),
        "  fit error: how far the snapshots' best combination is from the asked-for profile; "
        f"above {100 * POOR_FIT:g}% the result is an approximation",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """Errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def _int_option(minimum: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


DESCRIPTION = f"""\
Post-hoc EMA on the digits demo: train the demo's CNN as `emakit demo` does (same data,
model, SGD settings and seed) with an EMA that tracks two power-function averages,
sigma_rel {TRACKED_SIGMA_REL[0]:g} and {TRACKED_SIGMA_REL[1]:g}, and writes about {TARGET_SNAPSHOTS} snapshots of both. Then rebuild
the average of {len(default_sweep())} sigma_rel values from 0.02 to 0.25 from the snapshots, evaluate
each on the validation split, and print and plot accuracy against sigma_rel.

Files written to runs/posthoc-<timestamp>/ (or DIR with --out):
  snapshots/        snapshot-000000.safetensors, ...: both averages every few batches
                    (emakit posthoc snapshots/ --sigma-rel S --out FILE rebuilds any one)
  posthoc.json      every sigma_rel with its accuracy, loss and fit error; the tracked
                    averages evaluated directly; the best; the reconstruction check
  posthoc.png       accuracy and loss against sigma_rel (not with --no-plot)"""


def build_parser() -> argparse.ArgumentParser:
    """The post-hoc demo's command line; imports no torch."""
    p = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--posthoc", action="store_true", help=argparse.SUPPRESS)  # `emakit demo --posthoc` passes it on
    p.add_argument(
        "--epochs",
        type=_int_option(1, "a positive integer"),
        default=_DEMO.epochs,
        help="epochs to train (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_int_option(0, "a non-negative integer"),
        default=_DEMO.seed,
        help="seeds the model's initialisation and the shuffling (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_int_option(1, "a positive integer"),
        default=_DEMO.threads,
        help="torch CPU threads; one is fastest for this tiny model (default: %(default)s)",
    )
    p.add_argument("--out", metavar="DIR", help="write to DIR (default: runs/posthoc-<YYYYmmdd-HHMMSS>/)")
    p.add_argument("--no-plot", action="store_true", help="skip posthoc.png (and importing matplotlib)")
    return p


def _default_out() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = Path("runs") / f"posthoc-{stamp}", 1
    while out.exists():
        n += 1
        out = Path("runs") / f"posthoc-{stamp}-{n}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the post-hoc demo with ``argv`` (default: ``sys.argv[1:]``); return the exit status (2: bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a bad option (2), already reported
        return int(e.code or 0)
    needed = {"safetensors": "safetensors", "sklearn": "scikit-learn"}
    if not args.no_plot:
        needed["matplotlib"] = "matplotlib"
    missing = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"{PROG}: error: needs {', '.join(missing)}: pip install -e '.[demo]'", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out is not None else _default_out()
    config = PosthocDemoConfig(out=out, epochs=args.epochs, seed=args.seed, threads=args.threads, plot=not args.no_plot)
    try:
        _check_config(config)
    except OptionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{PROG}: digits, {config.epochs} epoch{'s' if config.epochs != 1 else ''}, seed {config.seed}; EMA with "
        f"sigma_rel {list(TRACKED_SIGMA_REL)}, about {config.snapshots} snapshots; writing to {out}/",
        flush=True,
    )
    try:
        summary = run_posthoc_demo(config)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    print()
    print(format_table(summary))
    print("  files:")
    for path in summary["files"].values():
        print(f"    {path}")
    seconds = summary["seconds"]
    print(
        f"\n  {seconds['total']:.1f} s (training {seconds['train']:.1f} s, rebuilding and evaluating {seconds['sweep']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
