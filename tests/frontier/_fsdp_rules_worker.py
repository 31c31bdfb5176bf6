"""Worker for the 2-rank FSDP2 test of the rules: ``torchrun --standalone --nproc_per_node=2 _fsdp_rules_worker.py OUT``.

Each rule trains a small model sharded with FSDP2 (gloo, CPU) on a batch ramp, each rank on its half of every
batch, the averager told the whole step's samples and tokens. Each rank writes ``OUT/rank{r}.pt``: its local
shards of the evaluated weights and of the training weights per rule, the collectives run inside the averager's
steps and reads, and the sizes of BEMA's theta_0 against its own parameter shards. :func:`train` is shared with
the test, which runs it in one process without FSDP.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _collectives import count_collectives

from emakit import BEMA, EMA
from emakit.averaging import Averager

RAMP = [8, 8, 16, 16, 32, 32, 8, 16]  # samples per optimizer step, both ranks together
WORLD = 2
RULES: dict[str, Callable[[], Averager]] = {
    "bema": lambda: BEMA(rho=5.0, gamma=1.5, kappa=0.6, eta=0.3, update_interval="2ba"),
    "tokens": lambda: EMA(half_life="300tok"),
    "half_life_fraction": lambda: EMA(half_life_fraction=0.2),
}


class Net(nn.Module):
    """Uneven shards over 2 ranks (63 rows: 32 + 31; 5 rows: 3 + 2; 1 row: 1 + an empty shard)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 63)
        self.fc2 = nn.Linear(63, 5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return (to_local() if callable(to_local) else tensor).detach().clone()


def train(model: nn.Module, averager: Averager, rank: int | None) -> list[str]:
    """SGD over RAMP (the whole batch, or rank ``rank``'s half); returns the collectives the averager ran."""
    averager.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    calls: list[str] = []
    for step, size in enumerate(RAMP):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(size, 16, generator=g), torch.randn(size, 5, generator=g)
        if rank is not None:
            half = size // WORLD
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with count_collectives() as during:
            averager.step(num_samples=size, num_tokens=size * 7 + step)  # sequences of 7 tokens, and some
            evaluated = {name: local(t) for name, t in averager.ema_tensors.items()}
        calls += during
    assert evaluated
    return calls


def main(out: Path) -> None:
    import torch.distributed as dist

    from emakit._compat import fully_shard_function

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, make in RULES.items():
        model = Net()
        fully_shard_function()(model)
        averager = make()
        calls = train(model, averager, rank)
        results[name] = {
            "calls": calls,
            "evaluated": {n: local(t) for n, t in averager.ema_tensors.items()},
            "training": {n: local(p) for n, p in model.named_parameters()},
            "timestamp": averager.timestamp.state_dict(),
        }
        if name == "bema":
            theta_0 = averager.state_dict()["theta_0"]
            results[name]["theta_0_local_numel"] = {n: local(t).numel() for n, t in theta_0.items()}
            results[name]["param_local_numel"] = {n: local(p).numel() for n, p in model.named_parameters()}
            results[name]["theta_0_type"] = sorted({type(t).__name__ for t in theta_0.values()})
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # teardown of the process group sometimes aborts here; the results are written


if __name__ == "__main__":
    main(Path(sys.argv[1]))
