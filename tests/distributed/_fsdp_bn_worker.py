"""emakit's Trainer(parallelism='fsdp') with BatchNorm on 2 CPU ranks (gloo): run with torchrun, see __main__.

``python -m torch.distributed.run --standalone --nproc_per_node=2 _fsdp_bn_worker.py OUT``: an uninterrupted
2-epoch run (a DCP checkpoint every 2 batches, a sharded snapshot every 4, an export at the end) and the same
run resumed from its mid-epoch checkpoint ``ep0-ba2``; the same pair for a BEMA (whose evaluated weights read
``theta_0``). FSDP2 leaves the BatchNorm buffers unsynchronised, so
each rank's statistics and its average of them are its own. Each rank saves what it holds to ``OUT/rank{R}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import BEMA, EMA, Trainer
from emakit.averaging import replicated
from emakit.distributed import export_ema_weights, local_tensor


class BatchNormNet(nn.Module):
    """Linear(4, 6) -> BatchNorm1d(6) -> ReLU -> Linear(6, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_trainer(out: Path, bema: bool = False, **kwargs: Any) -> tuple[Trainer, EMA | BEMA, nn.Module]:
    torch.manual_seed(0)
    model = BatchNormNet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 1.0
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (32,), generator=g)), batch_size=4, shuffle=True)
    snapshots = {k: kwargs.pop(k, None) for k in ("snapshot_folder", "snapshot_interval")}
    ema: EMA | BEMA = BEMA(update_interval="1ba") if bema else EMA(half_life="2ba", **snapshots)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(
        model,
        data,
        "2ep",
        algorithms=[ema],
        optimizers=optimizer,
        seed=3,
        progress_bar=False,
        parallelism="fsdp",
        **kwargs,
    )
    return trainer, ema, model


def held(trainer: Trainer, ema: EMA | BEMA) -> dict[str, Any]:
    """This rank's own average (every tensor, its shards) and training tensors (its shards, its buffers)."""
    return {
        "ema": {n: t.detach().clone() for n, t in ema.ema_tensors.items()},
        "weights": {n: local_tensor(t).detach().clone() for n, t in trainer.state.model.state_dict().items()},
        "n_averaged": ema.n_averaged,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer, ema, _ = make_trainer(
        out, save_folder=out / "ckpt", save_interval="2ba", snapshot_folder=out / "snapshots", snapshot_interval="4ba"
    )
    trainer.fit()
    export_ema_weights(trainer, out / "export.safetensors")
    record = {"uninterrupted": held(trainer, ema)}
    resumed, resumed_ema, _ = make_trainer(out, load_path=out / "ckpt" / "ep0-ba2")
    resumed.fit()
    record["resumed"] = held(resumed, resumed_ema)
    # BEMA's evaluated weights read theta_0 (the weights at its start), buffers included
    bema, bema_ema, _ = make_trainer(out, bema=True, save_folder=out / "bema_ckpt", save_interval="2ba")
    bema.fit()
    record["bema_uninterrupted"] = held(bema, bema_ema)
    bema, bema_ema, _ = make_trainer(out, bema=True, load_path=out / "bema_ckpt" / "ep0-ba2")
    bema.fit()
    record["bema_resumed"] = held(bema, bema_ema)
    rank = int(os.environ["RANK"])
    replicated.ARRIVAL_TIMEOUT_S = 2.0
    if rank == 0:  # the usual mistake: the EMA's state saved on rank 0 alone
        try:
            resumed_ema.state_dict()
        except RuntimeError as e:
            record["rank0_only"] = str(e)
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # a gloo teardown abort must not fail a run whose results are written


if __name__ == "__main__":
    main(Path(sys.argv[1]))
