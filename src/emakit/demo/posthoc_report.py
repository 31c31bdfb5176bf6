"""What the post-hoc demo shows: the sweep as a plot (accuracy and loss against ``sigma_rel``) and as a text
table. Matplotlib is imported when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emakit.atomic import atomic_file
from emakit.demo.posthoc_config import POOR_FIT

__all__ = [
    "format_table",
    "plot_sweep",
]


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
    try:
        with atomic_file(path, overwrite=True) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
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
