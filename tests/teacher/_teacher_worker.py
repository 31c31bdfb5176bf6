"""Self-distillation with a live EMA teacher, shared by the tests and their 2-rank worker.

Run as ``torchrun --standalone --nproc_per_node=2 _teacher_worker.py OUT``: each rank trains the FSDP2-sharded
student (one unit per block, then the root) on its half of every global batch, with the teacher's outputs in
the loss, uninterrupted and resumed mid-run, and saves what it saw to ``OUT/rank{r}.pt``. The tests run
:func:`train` in one process (no sharding, the whole batches) for the expectations.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from emakit import EMA
from emakit.averaging.momentum import CosineMomentum
from emakit.distributed import local_tensor

STEPS = 6
GLOBAL_BATCH = 8
RESUME_AT = 3
BASE = 0.8  # far from 1, so that the teacher moves visibly in 6 steps


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    """101 hidden rows (51 and 50 over 2 ranks) and a frozen output bias that the EMA does not keep."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 101)
        self.blocks = nn.ModuleList([Block(101), Block(101)])
        self.head = nn.Linear(101, 10)
        self.frozen = nn.Parameter(torch.linspace(-1, 1, 10), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h) + self.frozen


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def shard(net: Net) -> Net:
    from torch.distributed.fsdp import fully_shard

    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    return net


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each step's global batch, its augmented view, and a fixed probe batch for the teacher."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 12, generator=g)
    return x, x + 0.1 * torch.randn(x.shape, generator=g), torch.randn(5, 12, generator=g)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DINO's: cross-entropy of the student's tempered softmax against the teacher's sharper one."""
    target = torch.softmax(teacher / 0.5, dim=-1)
    return -(target * torch.log_softmax(student, dim=-1)).sum(-1).mean()


def cosine_oracle(i: int, base: float, final: float, total: int) -> float:
    """DINO's ``cosine_scheduler`` value at iteration ``i`` (0-based), held at ``final`` from ``total`` on."""
    if i >= total:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / total))


def make_run(sharded: bool) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    model = make_net()
    if sharded:
        shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    ema = EMA(schedule=CosineMomentum(base=BASE))
    ema.attach(model, max_duration=f"{STEPS}ba")
    return model, optimizer, ema


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    steps: range,
    rank: int = 0,
    world: int = 1,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``steps`` (global batches split over ``world`` ranks); the teacher's probe outputs after each, and
    ``after_step(step)`` called after each EMA update."""
    x, views, probe = data()
    per = GLOBAL_BATCH // world
    seen: dict[str, Any] = {"probe": {}, "grads": []}
    for step in steps:
        batch, view = x[step, rank * per : (rank + 1) * per], views[step, rank * per : (rank + 1) * per]
        with torch.no_grad():
            target = (ema.ema_model if ema.started else model)(batch)
        loss = distillation_loss(model(view), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        if after_step is not None:
            after_step(step)
        teacher = ema.ema_model
        seen["probe"][step] = teacher(probe).detach().clone()
        seen["grads"].extend(p.grad is not None or p.requires_grad for p in teacher.parameters())
    return seen


def clone(value: Any) -> Any:
    """A tensor copied (a saved state kept in memory must not follow the live one); anything else as is."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def launch(worker: Path, out: Path) -> list[dict[str, Any]]:
    """Run ``worker OUT`` on 2 ranks with torchrun; what each rank saved to ``OUT/rank{r}.pt``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, Any] = {}

    model, optimizer, ema = make_run(sharded=True)
    seen = train(model, optimizer, ema, range(STEPS), rank, world)
    teacher = ema.ema_model
    named = dict(model.named_parameters())
    record["uninterrupted"] = {"probe": seen["probe"], "weights": full_weights(model), "grads": seen["grads"]}
    record["structure"] = {
        name: {
            "dtensor": type(p).__name__,
            "placements": str(p.placements),
            "student_placements": str(named[name].placements),
            "local_rows": local_tensor(p).shape[0],
            "rows": p.shape[0],
            "shares_average": name in ema.ema_tensors
            and local_tensor(p).data_ptr() == ema.ema_tensors[name].data_ptr(),
            "shares_student": local_tensor(p).data_ptr() == local_tensor(named[name]).data_ptr(),
            "requires_grad": p.requires_grad,
        }
        for name, p in teacher.named_parameters()
    }
    record["teacher_training"] = teacher.training
    record["ema_bytes"] = ema.storage.nbytes
    record["student_local_bytes"] = sum(local_tensor(p).nbytes for p in model.parameters())
    record["full_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())

    model, optimizer, ema = make_run(sharded=True)
    first = train(model, optimizer, ema, range(RESUME_AT), rank, world)
    states = tree_map(clone, (model.state_dict(), optimizer.state_dict(), ema.state_dict()))
    del model, optimizer, ema
    model, optimizer, ema = make_run(sharded=True)
    model.load_state_dict(states[0])
    optimizer.load_state_dict(states[1])
    ema.load_state_dict(states[2])
    second = train(model, optimizer, ema, range(RESUME_AT, STEPS), rank, world)
    record["resumed"] = {"probe": {**first["probe"], **second["probe"]}, "weights": full_weights(model)}

    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
