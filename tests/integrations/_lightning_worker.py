"""A tiny LightningModule, data and recorders for the Lightning tests; run under torchrun it is the DDP worker.

``python -m torch.distributed.run --standalone --nproc_per_node=2 _lightning_worker.py OUT`` trains with
``strategy="ddp"`` on 2 CPU processes (Lightning sees torchrun's environment and launches nothing itself),
once plainly and once with ``flatten_model=True, overlap=True``; each rank writes what its EMA holds to
``OUT/rank{R}.pt``. Lightning always shuffles a training loader under DDP (its ``DistributedSampler``, seed 0,
``set_epoch`` every epoch), giving rank r the positions r, r+2, ... of each epoch's permutation; so one
process with the same sampler for 1 replica and batches of 8 sees the same 8 samples in each global batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from emakit.integrations.lightning import EMACallback

SEED = 0
#: Lightning's notices about this tiny CPU setup, silenced in the tests that fit with it.
LIGHTNING_NOTICES = (
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
    "ignore:.*GPU available.*",
    "ignore:.*The number of training batches.*",
    "ignore:.*litlogger.*",
    "ignore:You defined a `validation_step` but have no `val_dataloader`.*",
)
DDP_EPOCHS = 2


class Net(pl.LightningModule):
    """Linear -> (BatchNorm) -> ReLU -> Linear, SGD with momentum; logs ``val_loss`` per epoch."""

    def __init__(self, batchnorm: bool = True, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(4, 16)
        self.bn = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(16, 3)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(x))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(x))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_net(seed: int = SEED, batchnorm: bool = True) -> Net:
    torch.manual_seed(seed)
    return Net(batchnorm=batchnorm)


def make_data(n: int = 48, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def make_loader(n: int = 48, batch_size: int = 8, seed: int = 1) -> DataLoader:
    """Fixed random data in a fixed order: a resumed run sees the same batches as an uninterrupted one."""
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


def make_trainer(callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


class StepRecorder(Callback):
    """The training weights after every optimizer step (when ``global_step`` grows)."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self._last = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.after_step.append(weights(pl_module))


class EvalRecorder(Callback):
    """Put after the EMACallback: the weights inside each validation loop, and the module's right after it.

    Its ``on_validation_epoch_start`` runs after the EMA's swap; its ``on_validation_end`` after the swap back.
    ``before`` is what the module held just before validation (at the last ``on_train_batch_end``).
    """

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.during: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []
        self.metrics: list[float] = []
        self._latest: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._latest = weights(pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        assert self._latest is not None
        self.before.append(self._latest)
        self.during.append(weights(pl_module))
        self.steps.append(trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.after.append(weights(pl_module))
        self.metrics.append(float(trainer.callback_metrics["val_loss"]))


def ddp_fit(devices: int, **ema_kwargs: Any) -> tuple[EMACallback, Net]:
    """The run the DDP test compares: 2 epochs of 6 global batches of 8, half-life 3 optimizer steps.

    No BatchNorm: each rank would normalise over its own 4 samples, which one process with 8 cannot match.
    """
    model = make_net(batchnorm=False)
    callback = EMACallback(**{"half_life": "3ba", **ema_kwargs})
    if devices > 1:
        trainer = make_trainer([callback], max_epochs=DDP_EPOCHS, devices=devices, strategy="ddp")
        trainer.fit(model, make_loader(batch_size=8 // devices))
    else:  # the order Lightning's DistributedSampler gives the two ranks together
        data = make_data()
        sampler: DistributedSampler[Any] = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
        trainer = make_trainer([callback], max_epochs=DDP_EPOCHS)
        trainer.fit(model, DataLoader(data, batch_size=8, sampler=sampler))
    return callback, model


def posthoc_settings(folder: Path) -> dict[str, Any]:
    """Post-hoc EMA through the callback: two power profiles, a snapshot every 2 optimizer steps."""
    return {"half_life": None, "sigma_rel": [0.05, 0.1], "snapshot_interval": "2ba", "snapshot_folder": folder}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    runs: tuple[tuple[str, dict[str, Any]], ...] = (
        ("plain", {}),
        ("flat_overlap", {"flatten_model": True, "overlap": True}),
        ("posthoc", posthoc_settings(out / "snapshots")),
    )
    for name, kwargs in runs:
        callback, model = ddp_fit(2, **kwargs)
        results[name] = {
            "ema": {n: t.detach().clone() for n, t in callback.averager.ema_tensors.items()},
            "weights": weights(model),
            "num_updates": (callback.averager.n_averaged - 1),
            "batch": callback.averager.timestamp.batch,
        }
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
