"""curves.png: raw vs EMA validation accuracy and loss against batches (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emakit.atomic import atomic_file

__all__ = ["plot_curves"]

RAW_COLOR = "#e07b39"
EMA_COLOR = "#1f5fa8"


def _label(kind: str, summary: dict[str, Any]) -> str:
    name = "raw training weights" if kind == "raw" else "EMA weights"
    stats = summary.get(kind)
    if stats and stats.get("noise_pp") is not None:
        return f"{name} (noise {stats['noise_pp']:.2f} pp)"
    return name


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: Path,
    summary: dict[str, Any],
    title: str = "",
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Draw validation accuracy (left) and loss (right, log scale) for raw and EMA weights; save to ``path``
    (an existing file is replaced only with ``overwrite``), with ``metadata`` as the PNG's text chunks.

    The accuracy axis is zoomed to the range the curves reach after the first fifth of training, where
    the difference between them is; the text in the panel says so when early points fall below it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no evaluation records to plot")
    batches = [r["batch"] for r in records]
    total = summary.get("total_batches") or batches[-1]
    ema_rows = [r for r in records if r["ema_started"]]
    ema_batches = [r["batch"] for r in ema_rows]

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    raw_acc = [100 * r["raw_accuracy"] for r in records]
    ema_acc = [100 * r["ema_accuracy"] for r in ema_rows]
    ax_acc.plot(batches, raw_acc, color=RAW_COLOR, lw=1.2, marker=".", ms=4, label=_label("raw", summary))
    ax_acc.plot(ema_batches, ema_acc, color=EMA_COLOR, lw=2.2, label=_label("ema", summary))
    late = [a for b, a in zip(batches, raw_acc, strict=True) if b >= 0.2 * total]
    late += [a for b, a in zip(ema_batches, ema_acc, strict=True) if b >= 0.2 * total]
    if late:
        bottom = max(0.0, min(late) - 2.0)
        ax_acc.set_ylim(bottom, 100.5)
        hidden = sum(1 for a in raw_acc + ema_acc if a < bottom)
        if hidden:
            ax_acc.text(
                0.98,
                0.03,
                f"{hidden} early evaluation(s) below {bottom:.0f}% not shown",
                transform=ax_acc.transAxes,
                ha="right",
                va="bottom",
                fontsize=8,
                color="0.4",
            )
    ax_acc.set_ylabel("validation accuracy (%)")

    raw_loss = [(b, r["raw_loss"]) for b, r in zip(batches, records, strict=True) if r["raw_loss"] is not None]
    ema_loss = [(r["batch"], r["ema_loss"]) for r in ema_rows if r["ema_loss"] is not None]
    if raw_loss:
        ax_loss.plot(
            *zip(*raw_loss, strict=True), color=RAW_COLOR, lw=1.2, marker=".", ms=4, label="raw training weights"
        )
    if ema_loss:
        ax_loss.plot(*zip(*ema_loss, strict=True), color=EMA_COLOR, lw=2.2, label="EMA weights")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("validation loss (cross-entropy, log scale)")

    batches_per_epoch = next((r["batch"] / r["epoch"] for r in records if r.get("epoch")), None)
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("training batches")
        ax.set_xlim(0, total)
        ax.grid(True, alpha=0.3)
        ax.axvline(total / 2, color="0.5", ls=":", lw=1)
        if batches_per_epoch:
            bpe = batches_per_epoch
            top = ax.secondary_xaxis("top", functions=(lambda b, bpe=bpe: b / bpe, lambda e, bpe=bpe: e * bpe))
            top.set_xlabel("epochs")
    ax_acc.text(total / 2, 0.98, " noise measured →", transform=ax_acc.get_xaxis_transform(), fontsize=8, va="top")
    ax_acc.legend(loc="lower right" if not late else "center right", fontsize=9)
    ax_loss.legend(loc="upper right", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    try:
        with atomic_file(path, overwrite=overwrite) as f:
            fig.savefig(f, format="png", dpi=110, metadata=dict(metadata or {}))
    finally:
        plt.close(fig)
    return path
