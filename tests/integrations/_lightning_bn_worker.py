"""EMACallback with BatchNorm under Lightning's ModelParallelStrategy (FSDP2, data_parallel_size=2), 2 CPU ranks.

``python -m torch.distributed.run --standalone --nproc_per_node=2 _lightning_bn_worker.py OUT``: an uninterrupted
2-epoch fit (a checkpoint folder per epoch, a sharded snapshot every 6 steps, an export at the end) and the same
fit stopped at the epoch-0 checkpoint and resumed. FSDP2 leaves the BatchNorm buffers unsynchronised, so each
rank's statistics, and its average of them, are its own. Each rank saves what it holds to ``OUT/rank{R}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import export_ema_weights
from emakit.integrations.lightning import EMACallback
from emakit.parallel.sharding import local_tensor

HALF_LIFE = "3ba"
BN = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


class BatchNormNet(pl.LightningModule):
    """Linear(4, 6) -> BatchNorm1d(6) -> ReLU -> Linear(6, 3); fc1, fc2 and the root fully sharded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.fc1, mesh=mesh)
        fully_shard(self.fc2, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def make_net() -> BatchNormNet:
    torch.manual_seed(0)
    return BatchNormNet()


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 1.0
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (48,), generator=g)), batch_size=4)


def options(**kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 2,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return {**base, **kwargs, "strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}


def held(callback: EMACallback, model: nn.Module) -> dict[str, Any]:
    """This rank's own average (every tensor, its shards) and training tensors (its shards, its buffers)."""
    return {
        "ema": {n: t.detach().clone() for n, t in callback.averager.ema_tensors.items()},
        "weights": {n: local_tensor(t).detach().clone() for n, t in model.state_dict().items()},
        "n_averaged": callback.averager.n_averaged,
    }


def uninterrupted(out: Path) -> dict[str, Any]:
    model = make_net()
    callback = EMACallback(half_life=HALF_LIFE, snapshot_folder=out / "snapshots", snapshot_interval="6ba")
    saver = ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(callbacks=[callback, saver], **options(enable_checkpointing=True))
    trainer.fit(model, loader())
    export_ema_weights(callback, out / "export.safetensors")
    return held(callback, model)


def resumed(out: Path) -> dict[str, Any]:
    first = EMACallback(half_life=HALF_LIFE)
    saver = ModelCheckpoint(dirpath=out / "ckpt_stop", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(callbacks=[first, saver], **options(max_epochs=1, enable_checkpointing=True))
    trainer.fit(make_net(), loader())
    model = make_net()
    callback = EMACallback(half_life=HALF_LIFE)
    trainer = pl.Trainer(callbacks=[callback], **options())
    trainer.fit(model, loader(), ckpt_path=out / "ckpt_stop" / "epoch=0.ckpt")
    return held(callback, model)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.save({"uninterrupted": uninterrupted(out), "resumed": resumed(out)}, out / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # a gloo teardown abort must not fail a run whose results are written


if __name__ == "__main__":
    main(Path(sys.argv[1]))
