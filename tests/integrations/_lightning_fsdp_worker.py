"""EMACallback under Lightning's ModelParallelStrategy on 2 CPU ranks (gloo): run with torchrun, see __main__.

``python -m torch.distributed.run --standalone --nproc_per_node=2 _lightning_fsdp_worker.py OUT`` runs, in one
launch, FSDP2 (``fully_shard`` in ``configure_model``, data_parallel_size=2) fits: uninterrupted, stopped at an
epoch-end checkpoint and resumed, ``weights_after_fit="ema"``; and a tensor-parallel fit (ColwiseParallel /
RowwiseParallel, tensor_parallel_size=2). Each rank saves what it saw to ``OUT/rank{R}.pt``; rank 0 exports
the EMA whole. The model has uneven shards (7 and 3 rows on 2 ranks) and a 1-element parameter (rank 1's
shard of it is empty).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # the collective counter
from _collectives import count_collectives

from emakit import export_ema_weights
from emakit.integrations.lightning import EMACallback
from emakit.parallel.sharding import local_tensor

EPOCHS = 2
HALF_LIFE = "3ba"
TP_HIDDEN = 8


class ShardedNet(pl.LightningModule):
    """Linear(4, hidden) -> ReLU -> Linear(hidden, 3), logits times a learned 1-element scale; SGD with momentum.

    ``parallel`` picks what ``configure_model`` applies: ``"fsdp"`` (fully_shard each layer and the root over
    the data-parallel mesh), ``"tp"`` (fc1 column-wise, fc2 row-wise over the tensor-parallel mesh) or None.
    Tensor parallelism needs an even hidden size: DTensor infers the activations' global shape from even shards.
    """

    def __init__(self, parallel: str | None = None, hidden: int = 7) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        self.scale = nn.Parameter(torch.ones(1))
        self.parallel = parallel

    def configure_model(self) -> None:
        if self.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.fc1, mesh=mesh)
            fully_shard(self.fc2, mesh=mesh)
            fully_shard(self, mesh=mesh)
        elif self.parallel == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            mesh = self.device_mesh["tensor_parallel"]
            parallelize_module(self, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(x), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def make_sharded_net(parallel: str | None = None, hidden: int = 7) -> ShardedNet:
    torch.manual_seed(0)
    return ShardedNet(parallel, hidden)


def train_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g))


def val_data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))


def single_process_loader() -> DataLoader:
    """What Lightning's DistributedSampler (seed 0, shuffled) gives 2 ranks together, in batches of 8."""
    data = train_data()
    return DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=0))


def trainer_options(**kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": EPOCHS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return options


def local_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards of every tensor of ``module`` (whole tensors where not sharded), copied."""
    return {name: local_tensor(t).detach().clone() for name, t in module.state_dict().items()}


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` whole (a collective for sharded ones)."""
    out = {}
    for name, t in module.state_dict().items():
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()
    return out


class EvalRecorder(Callback):
    """After the EMACallback: this rank's shards just before, inside and after each validation loop."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.during: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.metrics: list[float] = []
        self._latest: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._latest = local_weights(pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._latest is not None
        self.before.append(self._latest)
        self.during.append(local_weights(pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after.append(local_weights(pl_module))
        self.metrics.append(float(trainer.callback_metrics["val_loss"]))


class CollectiveCounter(Callback):
    """Wraps ``callback.averager.step`` to count the collectives each update runs."""

    def __init__(self, callback: EMACallback) -> None:
        self.per_step: list[int] = []
        ema = callback.averager
        step = ema.step

        def counted_step(*args: Any, **kwargs: Any) -> bool:
            with count_collectives() as calls:
                done = step(*args, **kwargs)
            self.per_step.append(len(calls))
            return done

        ema.step = counted_step  # type: ignore[method-assign]


def fsdp_strategy() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def fit_fsdp(out: Path) -> dict[str, Any]:
    """Uninterrupted: 2 epochs, a checkpoint folder at each epoch end, every EMA update's collectives counted."""
    model = make_sharded_net("fsdp")
    callback = EMACallback(half_life=HALF_LIFE)
    counter = CollectiveCounter(callback)
    recorder = EvalRecorder()
    saver = ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    options = trainer_options(enable_checkpointing=True)
    trainer = pl.Trainer(callbacks=[callback, recorder, saver], strategy=fsdp_strategy(), devices=2, **options)
    trainer.fit(model, DataLoader(train_data(), batch_size=4), DataLoader(val_data(), batch_size=4))
    # The counter sees collectives: a gather inside it is counted (so zero counts mean something).
    with count_collectives() as probe:
        _ = model.fc2.weight.full_tensor()
    export_ema_weights(callback, out / "fsdp_ema.safetensors")
    return {
        "collectives_per_update": counter.per_step,
        "probe_collectives": len(probe),
        "num_updates": (callback.averager.n_averaged - 1),
        "batch": callback.averager.timestamp.batch,
        "local_ema": {n: t.clone() for n, t in callback.averager.ema_tensors.items()},
        "local_weights": local_weights(model),
        "full_weights": full_weights(model),
        "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()},
        "before": recorder.before,
        "during": recorder.during,
        "after": recorder.after,
        "metrics": recorder.metrics,
    }


def resumed_fsdp(out: Path) -> dict[str, Any]:
    """Stop after epoch 1 (its checkpoint folder), then a new Trainer resumes it to the end."""
    first = EMACallback(half_life=HALF_LIFE)
    saver = ModelCheckpoint(dirpath=out / "ckpt_stop", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    options = trainer_options(max_epochs=1, enable_checkpointing=True)
    trainer = pl.Trainer(callbacks=[first, saver], strategy=fsdp_strategy(), devices=2, **options)
    trainer.fit(make_sharded_net("fsdp"), DataLoader(train_data(), batch_size=4))
    path = out / "ckpt_stop" / "epoch=0.ckpt"
    model = make_sharded_net("fsdp")
    callback = EMACallback(half_life=HALF_LIFE)
    trainer = pl.Trainer(callbacks=[callback], strategy=fsdp_strategy(), devices=2, **trainer_options())
    trainer.fit(model, DataLoader(train_data(), batch_size=4), ckpt_path=path)
    return {
        "local_ema": {n: t.clone() for n, t in callback.averager.ema_tensors.items()},
        "local_weights": local_weights(model),
        "num_updates": (callback.averager.n_averaged - 1),
        "checkpoint_files": sorted(p.name for p in path.iterdir()),
    }


def ema_after_fit() -> dict[str, Any]:
    model = make_sharded_net("fsdp")
    callback = EMACallback(half_life=HALF_LIFE, weights_after_fit="ema")
    trainer = pl.Trainer(callbacks=[callback], strategy=fsdp_strategy(), devices=2, **trainer_options())
    trainer.fit(model, DataLoader(train_data(), batch_size=4))
    return {
        "local_ema": {n: t.clone() for n, t in callback.averager.ema_tensors.items()},
        "module": local_weights(model),
    }


def fit_tp(out: Path) -> dict[str, Any]:
    """Tensor parallel on both ranks: each sees the whole batch of 8 (the data-parallel size is 1)."""
    model = make_sharded_net("tp", hidden=TP_HIDDEN)
    callback = EMACallback(half_life=HALF_LIFE)
    counter = CollectiveCounter(callback)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    trainer = pl.Trainer(callbacks=[callback], strategy=strategy, devices=2, **trainer_options())
    trainer.fit(model, single_process_loader(), DataLoader(val_data(), batch_size=8))
    export_ema_weights(callback, out / "tp_ema.safetensors")
    return {
        "collectives_per_update": counter.per_step,
        "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()},
        "full_weights": full_weights(model),
        "metrics": float(trainer.callback_metrics["val_loss"]),
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {
        "fsdp": fit_fsdp(out),
        "resumed": resumed_fsdp(out),
        "ema_after_fit": ema_after_fit(),
        "tp": fit_tp(out),
    }
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
