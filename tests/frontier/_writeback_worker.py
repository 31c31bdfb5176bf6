"""Write-back on 2 CPU ranks (gloo), shared by the tests and their worker.

Run as ``torchrun --standalone --nproc_per_node=2 _writeback_worker.py OUT``: each rank trains on its half of
every global batch, once under DDP and once sharded with FSDP2, with an EMA that copies every 3 steps (resetting
Adam's state of the written parameters) and pulls with strength 0.2 after the other updates. Each rank saves to
``OUT/rank{r}.pt`` its weights, its average and its write-back counts, and the collectives run inside
``ema.step()`` (the update and the write-back). :func:`train` also runs in one process, for the expectations.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from emakit import EMA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _collectives import count_collectives

STEPS = 10
GLOBAL_BATCH = 8


class Net(nn.Module):
    """Uneven shards over 2 ranks (9 rows: 5 and 4; 3 rows: 2 and 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 9)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def make_ema() -> EMA:
    return EMA(half_life="4ba").write_back(every="3ba", pull=0.2, optimizer_state="reset")


def data() -> torch.Tensor:
    return torch.randn(STEPS, GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(1))


def train(model: nn.Module, ema: EMA, rank: int = 0, world: int = 1) -> list[str]:
    """Adam on this rank's part of each global batch; returns the collectives run inside ``ema.step()``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, per = data(), GLOBAL_BATCH // world
    collectives: list[str] = []
    for step in range(STEPS):
        batch = x[step, rank * per : (rank + 1) * per]
        loss = (model(batch) - batch[:, :3].sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with count_collectives() as calls:
            ema.step()
        collectives += calls
    return collectives


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors (sharded ones gathered), detached copies."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in tensors.items()}


def outcome(model: nn.Module, ema: EMA, collectives: list[str]) -> dict[str, Any]:
    return {
        "weights": full(dict(model.named_parameters())),
        "average": full(ema.state_dict()["ema"]),
        "write_back": ema.state_dict()["write_back"],
        "collectives": collectives,
    }


def main(out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from emakit._compat import fully_shard_function

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, Any] = {}

    ddp = DistributedDataParallel(make_net())
    ema = make_ema()
    ema.attach(ddp)
    collectives = train(ddp, ema, rank, world)
    record["ddp"] = outcome(ddp.module, ema, collectives)

    fully_shard = fully_shard_function()
    model = make_net()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    ema = make_ema()
    ema.attach(model)
    collectives = train(model, ema, rank, world)
    record["fsdp"] = outcome(model, ema, collectives)
    record["fsdp_local_rows"] = {n: t.to_local().shape[0] for n, t in model.named_parameters()}

    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
