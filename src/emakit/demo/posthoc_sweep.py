"""The post-hoc demo's run: train with a two-profile EMA writing snapshots, then rebuild and evaluate every
``sigma_rel`` of the sweep from them (with :func:`emakit.posthoc.sweep.sweep`), check the reconstruction and
write ``posthoc.json`` (and the plot).

Torch and the training code are imported when a run starts, not when this module is.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emakit.atomic import write_bytes
from emakit.demo.posthoc_config import (
    CHECK_TOLERANCE,
    PLOT_FILE,
    POOR_FIT,
    SNAPSHOT_DIR,
    SUMMARY_FILE,
    TRACKED_SIGMA_REL,
    PosthocDemoConfig,
    check_config,
)
from emakit.demo.posthoc_report import plot_sweep

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "run_posthoc_demo",
]


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
    check_config(config)
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

    from emakit.averaging import EMA
    from emakit.demo.data import load_data
    from emakit.demo.model import build_model
    from emakit.demo.run import build_loaders
    from emakit.posthoc import execute_plan, plan_reconstruction, read_snapshot_index
    from emakit.posthoc.sweep import sweep
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

    def evaluate_weights(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        evaluated.load_state_dict(weights)
        return _metrics(evaluate(evaluated, val_loader, loss_fn))

    table = sweep(index, evaluate_weights, [f"power:{s!r}" for s in sigmas], metric="loss", progress=False)
    rows: list[dict[str, Any]] = [
        {
            "sigma_rel": sigma,
            "accuracy": row["accuracy"],
            "loss": row["loss"],
            "fit_error": row["fit_error"],
            "snapshots_used": row["snapshots_used"],
            "tracked": sigma in TRACKED_SIGMA_REL,
        }
        for sigma, row in zip(sigmas, table.rows, strict=True)
    ]
    sweep_s = time.perf_counter() - sweep_start

    # The check: the tracked profiles rebuilt at the last snapshot against the tracked averages' final values.
    distance = _floating_distance(finals[0], finals[1])
    tracked_rows = []
    for j, sigma in enumerate(TRACKED_SIGMA_REL):
        row = next(r for r in rows if r["sigma_rel"] == sigma)
        rebuilt = execute_plan(plan_reconstruction(index, sigma_rel=sigma))
        error = _floating_distance(rebuilt, finals[j]) / distance if distance > 0 else 0.0
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
    write_bytes(files["summary"], text.encode(), overwrite=True)
    summary["files"] = {k: str(v) for k, v in files.items()}
    return summary


def _title(config: PosthocDemoConfig, summary: dict[str, Any]) -> str:
    return (
        f"{summary['data']}: SGD lr={config.lr:g}, batch {config.batch_size}, {summary['total_batches']} batches, "
        f"seed {config.seed}; {summary['num_snapshots']} snapshots of sigma_rel "
        f"{' and '.join(f'{s:g}' for s in summary['tracked_sigma_rel'])}"
    )
