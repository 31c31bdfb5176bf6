"""The demo run: train the demo model with emakit's Trainer and EMA, record raw and EMA validation metrics.

Every evaluation is recorded twice from the same run: the Trainer evaluates on the EMA weights (swapped
into the model between EVAL_START and EVAL_END), and :class:`RawVsEmaRecorder`, a callback that runs at
EVAL_END after the EMA has put the training weights back, evaluates the raw training weights.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit.atomic import write_bytes
from emakit.averaging import EMA, Constant
from emakit.callbacks import CheckpointSaver
from emakit.callbacks.progress import show_progress_bar
from emakit.core import Callback
from emakit.demo.config import RUN_FILES, DemoConfig, OptionError, check_time_option
from emakit.demo.data import DemoData, load_data
from emakit.demo.model import build_model
from emakit.time import Time, TimeUnit
from emakit.trainer import Trainer, evaluate

if TYPE_CHECKING:
    from emakit.core.logger import Logger
    from emakit.core.state import State

__all__ = [
    "DemoConfig",
    "DemoResult",
    "OptionError",
    "RawVsEmaRecorder",
    "build_loaders",
    "noise",
    "prepare",
    "run_demo",
    "summarize",
]

METRICS_FILE, CURVES_FILE, EMA_WEIGHTS_FILE, SUMMARY_FILE, CHECKPOINT_DIR = RUN_FILES


@dataclass
class DemoResult:
    """What a run produced: the records, the files, and the live objects (for tests and notebooks)."""

    config: DemoConfig
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    files: dict[str, Path]
    trainer: Trainer
    ema: EMA
    data: DemoData
    wall_time_s: float = 0.0


def _batches_for(t: Time, batches_per_epoch: int, total: int, batch_size: int) -> float:
    """``t`` in batches of this run (ceil for samples), to compare ema_start with the run's length."""
    if t.unit == TimeUnit.BATCH:
        return float(t.value)
    if t.unit == TimeUnit.EPOCH:
        return float(t.value * batches_per_epoch)
    if t.unit == TimeUnit.SAMPLE:
        return float(math.ceil(t.value / batch_size))
    return float(t.value * total)


def build_loaders(data: DemoData, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Shuffled training batches (last partial batch dropped: BatchNorm needs full batches) and validation."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    val = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=512)
    return train, val


def prepare(config: DemoConfig) -> tuple[DemoData, EMA]:
    """Check every setting against the data, load the data and build the EMA.

    Raises:
        OptionError: a setting is invalid; ``option`` names it.
    """
    for option, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise OptionError(option, f"must be a positive integer, got {value!r}")
    if isinstance(config.eval_interval, bool) or not isinstance(config.eval_interval, int) or config.eval_interval <= 0:
        raise OptionError("--eval-interval", f"must be a positive integer, got {config.eval_interval!r}")
    if config.batch_size < 2:
        raise OptionError("--batch-size", f"must be at least 2 (BatchNorm needs 2 samples), got {config.batch_size}")
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise OptionError("--lr", f"must be a positive finite number, got {config.lr!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise OptionError("--seed", f"must be a non-negative integer, got {config.seed!r}")
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads <= 0):
        raise OptionError("--threads", f"must be a positive integer, got {config.threads!r}")
    try:
        device = torch.device(config.device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise OptionError("--device", f"must be cpu, cuda, cuda:N or mps, got {config.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device", f"{config.device!r} was asked for but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("--device", f"{config.device!r} was asked for but MPS is not available")

    units = (TimeUnit.BATCH, TimeUnit.EPOCH)
    half_life = check_time_option(config.half_life, "--half-life", units)
    update_interval = (
        check_time_option(config.update_interval, "--update-interval", units)
        if config.update_interval is not None
        else None
    )
    if update_interval is not None and update_interval.unit != half_life.unit:
        raise OptionError(
            "--update-interval",
            f"must be in --half-life's unit '{half_life.unit.value}', got {config.update_interval!r}",
        )
    ema_start = check_time_option(config.ema_start, "--ema-start", tuple(TimeUnit), allow_zero=True)
    if ema_start.unit == TimeUnit.DURATION and ema_start.value > 1:
        raise OptionError("--ema-start", f"a fraction of the run ('dur') must be in [0, 1], got {config.ema_start!r}")

    try:
        data = load_data(config.data)
    except ValueError as e:
        raise OptionError("--data", str(e)) from None
    n_train = len(data.y_train)
    if config.batch_size > n_train:
        raise OptionError("--batch-size", f"{config.batch_size} is more than the {n_train} training samples")
    batches_per_epoch = n_train // config.batch_size
    total = batches_per_epoch * config.epochs
    if _batches_for(ema_start, batches_per_epoch, total, config.batch_size) > total:
        raise OptionError(
            "--ema-start",
            f"{config.ema_start!r} is after the end of training ({config.epochs} epochs = {total} batches)",
        )
    # flatten_model: the CNN's 14 small tensors become one buffer, so each update is one kernel (see README: Speed).
    ema = EMA(half_life=half_life, ema_start=ema_start, update_interval=update_interval, flatten_model=True)
    return data, ema


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class RawVsEmaRecorder(Callback):
    """At each EVAL_END: read the EMA's metrics, evaluate the raw weights, append a record and a JSON line.

    Runs after the EMA algorithm at EVAL_END, so ``state.model`` holds the training weights again while
    ``state.eval_metrics`` holds what the Trainer measured on the EMA weights. Before the EMA starts the
    Trainer evaluated the raw weights; the record then repeats them as the EMA numbers, with
    ``ema_started: false``. Also shows a progress bar (loss, latest raw and EMA accuracy).
    """

    def __init__(
        self,
        ema: EMA,
        val_loader: DataLoader,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        sink: IO[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.ema = ema
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.sink = sink
        self.progress = progress
        self.records: list[dict[str, Any]] = []
        self._bar: Any = None
        self._postfix: dict[str, str] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        if not self.progress or not show_progress_bar():
            return
        from tqdm.auto import tqdm

        total = state.batches_per_epoch * int(state.max_duration.value) if state.batches_per_epoch else None
        self._bar = tqdm(total=total, unit="ba", dynamic_ncols=True, leave=True, desc="training")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._bar is None:
            return
        if state.loss is not None:
            self._postfix["loss"] = f"{float(state.loss):.3f}"
        self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(1)

    def eval_end(self, state: State, logger: Logger) -> None:
        if self.ema.ema_weights_active:
            raise RuntimeError("the EMA weights are still in the model at EVAL_END; raw metrics would be EMA ones")
        ema_metrics = dict(state.eval_metrics)
        started = self.ema.started
        # the Trainer's evaluation loader: on several ranks each validation sample counts exactly once, as for the EMA
        loader = state.eval_dataloader if state.eval_dataloader is not None else self.val_loader
        raw = (
            evaluate(state.model, loader, self.loss_fn, state.device, all_reduce=state.world_size > 1)
            if started
            else ema_metrics
        )
        batches_per_epoch = state.batches_per_epoch or 0
        record: dict[str, Any] = {
            "batch": state.timestamp.batch,
            "epoch": round(state.timestamp.batch / batches_per_epoch, 4) if batches_per_epoch else None,
            "samples": state.timestamp.sample,
            "train_loss": _finite_or_none(float(state.loss)) if state.loss is not None else None,
            "raw_loss": _finite_or_none(raw["eval/loss"]),
            "raw_accuracy": raw["eval/accuracy"],
            "ema_loss": _finite_or_none(ema_metrics["eval/loss"]),
            "ema_accuracy": ema_metrics["eval/accuracy"],
            "ema_started": started,
        }
        self.records.append(record)
        if self.sink is not None:
            self.sink.write(json.dumps(record) + "\n")
            self.sink.flush()
        self._postfix["raw_acc"] = f"{record['raw_accuracy']:.3f}"
        self._postfix["ema_acc"] = f"{record['ema_accuracy']:.3f}" if started else "-"
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def noise(values: Sequence[float]) -> float:
    """Standard deviation of successive differences: how much a curve jumps between evaluations.

    Differencing removes the slow trend (the curve still improving), so what is left is evaluation-to-
    evaluation jitter. NaN for fewer than 3 values.
    """
    if len(values) < 3:
        return math.nan
    diffs = [b - a for a, b in itertools.pairwise(values)]
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))


def summarize(records: Sequence[dict[str, Any]], total_batches: int) -> dict[str, Any]:
    """Final and best accuracy and loss, and the accuracy noise over the second half, for raw and EMA.

    Noise is in percentage points, over evaluations after half of ``total_batches``; for the EMA only
    evaluations after it started count.
    """
    out: dict[str, Any] = {
        "total_batches": total_batches,
        "evaluations": len(records),
        "non_finite_evaluations": sum(
            1 for r in records if any(r[k] is None for k in ("train_loss", "raw_loss", "ema_loss"))
        ),
    }
    second_half = [r for r in records if r["batch"] > total_batches / 2]
    for kind in ("raw", "ema"):
        rows = [r for r in records if kind == "raw" or r["ema_started"]]
        if not rows:
            out[kind] = None
            continue
        best = max(rows, key=lambda r: r[f"{kind}_accuracy"])
        half = [r[f"{kind}_accuracy"] for r in second_half if kind == "raw" or r["ema_started"]]
        out[kind] = {
            "final_accuracy": rows[-1][f"{kind}_accuracy"],
            "final_loss": rows[-1][f"{kind}_loss"],
            "best_accuracy": best[f"{kind}_accuracy"],
            "best_batch": best["batch"],
            "noise_pp": _finite_or_none(100.0 * noise(half)),
            "noise_evaluations": len(half),
        }
    return out


def _save_ema_weights(ema: EMA, data: DemoData, config: DemoConfig, path: Path) -> None:
    """The EMA weights alone under the model's state_dict names, with what is needed to use them as metadata."""
    from safetensors.torch import save

    model = ema.ema_model
    # Contiguous clones: the EMA tensors are views of one flat buffer, and safetensors refuses shared storage.
    tensors = {name: t.detach().to("cpu").clone().contiguous() for name, t in model.state_dict().items()}
    metadata = {
        "format": "emakit.demo.ema_weights",
        "architecture": type(model).__name__,
        "input_shape": json.dumps(list(data.input_shape)),
        "classes": json.dumps(data.classes),
        "input_mean": json.dumps(data.mean),
        "input_std": json.dumps(data.std),
        "half_life": _half_life(ema),
        "num_updates": str(max(ema.n_averaged - 1, 0)),
        "data": data.source,
        "seed": str(config.seed),
    }
    write_bytes(path, save(tensors, metadata=metadata), overwrite=False)


def run_demo(config: DemoConfig, data: DemoData | None = None, ema: EMA | None = None) -> DemoResult:
    """Train, record, and write ``metrics.jsonl``, the checkpoint, ``ema_weights.safetensors``, ``summary.json``
    and (with ``config.plot``) ``curves.png`` into ``config.out``.

    ``data``/``ema`` come from :func:`prepare`, which runs here when they are not given.
    """
    start = time.perf_counter()
    if data is None or ema is None:
        data, ema = prepare(config)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        trainer, records = _train(config, data, ema)
    finally:
        torch.set_num_threads(threads_before)
    out = Path(config.out)
    files = {"metrics": out / METRICS_FILE, "ema_weights": out / EMA_WEIGHTS_FILE, "summary": out / SUMMARY_FILE}
    saver = next(cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver))
    files["checkpoint"] = saver.folder / saver.saved[-1]
    _save_ema_weights(ema, data, config, files["ema_weights"])
    summary = summarize(records, trainer.state.timestamp.batch)
    if config.plot:
        from emakit.demo.plot import plot_curves

        files["curves"] = out / CURVES_FILE
        plot_curves(records, files["curves"], summary, title=_title(config, data, ema))
    wall = time.perf_counter() - start
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    summary["run_seconds"] = round(wall, 2)
    write_bytes(files["summary"], (json.dumps(summary, indent=2) + "\n").encode(), overwrite=False)
    return DemoResult(config, records, summary, files, trainer, ema, data, wall_time_s=wall)


def _train(config: DemoConfig, data: DemoData, ema: EMA) -> tuple[Trainer, list[dict[str, Any]]]:
    """Build the model and loaders, train with the EMA, and record every evaluation into metrics.jsonl."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model: nn.Module = build_model(data.input_shape, data.num_classes)
    train_loader, val_loader = build_loaders(data, config.batch_size, config.seed)
    loss_fn = nn.functional.cross_entropy
    with open(out / METRICS_FILE, "w", encoding="utf-8") as sink:
        recorder = RawVsEmaRecorder(ema, val_loader, loss_fn, sink=sink, progress=config.progress)
        trainer = Trainer(
            model=model,
            train_dataloader=train_loader,
            max_duration=f"{config.epochs}ep",
            algorithms=[ema],
            callbacks=[recorder],
            optimizers=torch.optim.SGD(model.parameters(), lr=config.lr),
            loss_fn=loss_fn,
            eval_dataloader=val_loader,
            eval_interval=f"{config.eval_interval}ba",
            save_folder=out / CHECKPOINT_DIR,
            save_interval=f"{config.epochs}ep",  # one checkpoint, at the end
            device=config.device,
            seed=config.seed,
            progress_bar=False,
        )
        trainer.fit()
        if not recorder.records or recorder.records[-1]["batch"] != trainer.state.timestamp.batch:
            trainer.eval()  # the final weights, when the last batch was not an evaluation batch
    return trainer, recorder.records


def _title(config: DemoConfig, data: DemoData, ema: EMA) -> str:
    return (
        f"{data.source}: SGD lr={config.lr:g}, batch {config.batch_size}, {config.epochs} epochs; "
        f"EMA half-life {_half_life(ema)}, seed {config.seed}"
    )


def _half_life(ema: EMA) -> str:
    """The EMA's half-life as given (its schedule's description for an EMA given another way)."""
    schedule = ema.schedule
    return (
        str(schedule.half_lives[0]) if isinstance(schedule, Constant) and schedule.half_lives else schedule.describe()
    )
