"""Self-distillation with a live EMA teacher of a tensor-parallel student, shared by the tests and their worker.

Run as ``torchrun --standalone --nproc_per_node=2 _tp_teacher_worker.py OUT``: both ranks parallelise the
student with ``parallelize_module`` over a 1-D mesh of the 2 ranks (``up`` column-wise: weight and bias
``Shard(0)``; ``down`` row-wise: weight ``Shard(1)``, bias ``Replicate()``; ``head`` column-wise with its output
gathered, 11 rows as 6 + 5; a frozen bias left plain) and train on the same whole batches, with the teacher's outputs in the loss. Each rank
records, after each EMA update, the student's whole weights, the average (gathered, and this rank's own shards)
and the teacher's probe outputs. Then the same on the two 2-D meshes 2 ranks allow, FSDP2 and TP on each
parameter: ``(dp=1, tp=2)`` (TP really splits, FSDP2's dimension is trivial) and ``(dp=2, tp=1)`` (FSDP2 really
shards the batch and the weights, TP's dimension is trivial). Each rank saves what it saw to ``OUT/rank{r}.pt``.
The tests run :func:`run` in one process (no parallelism) for the expectations.
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
from emakit.averaging.momentum import CosineMomentum
from emakit.distributed import local_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _teacher_worker import BASE, STEPS, full_weights, train


class TPNet(nn.Module):
    """A column-wise then row-wise pair (Megatron's MLP), a head and a frozen bias the EMA does not keep.

    The pair's hidden width is even: torch's ``RowwiseParallel`` rebuilds its input from the local shards as if
    they were even (on 2 ranks a 101-wide hidden layer fails in the student's own forward, "a and b must have
    same reduction dim"); the head's 11 rows are uneven, its output gathered by DTensor itself."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 100)
        self.down = nn.Linear(100, 16)
        self.head = nn.Linear(16, 11)
        self.frozen = nn.Parameter(torch.linspace(-1, 1, 11), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x))))) + self.frozen


def parallelize(net: TPNet, mesh: Any) -> TPNet:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"up": ColwiseParallel(), "down": RowwiseParallel(), "head": ColwiseParallel(output_layouts=Replicate())}
    parallelize_module(net, mesh, plan)
    return net


def make_run(mesh: Any = None, dp_mesh: Any = None) -> tuple[TPNet, torch.optim.Optimizer, EMA]:
    """The student (tensor-parallel over ``mesh``, then sharded by FSDP2 over ``dp_mesh``, if given), its
    optimizer, and an EMA with DINO's ramp."""
    torch.manual_seed(0)
    model = TPNet()
    if mesh is not None:
        parallelize(model, mesh)
    if dp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=dp_mesh)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    ema = EMA(schedule=CosineMomentum(base=BASE))
    ema.attach(model, max_duration=f"{STEPS}ba")
    return model, optimizer, ema


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor copy (a TP output is an AsyncCollectiveTensor: waited for; a DTensor: gathered)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    if hasattr(tensor, "wait"):
        tensor = tensor.wait()
    return torch.Tensor(tensor.detach()).clone() if type(tensor) is not torch.Tensor else tensor.detach().clone()


def whole(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (a shard of the average) gathered as the whole tensor, sharded as ``like`` is (if a DTensor)."""
    if not hasattr(like, "placements"):
        return local
    dtensor = type(like)
    shards = dtensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return shards.full_tensor()


def run(mesh: Any = None, dp_mesh: Any = None) -> dict[str, Any]:
    """Train all steps (each data-parallel rank on its share of the batches); per step the student's whole
    weights, the average gathered and this rank's shards."""
    model, optimizer, ema = make_run(mesh, dp_mesh)
    dp_rank, dp_size = (0, 1) if dp_mesh is None else (dp_mesh.get_local_rank(), dp_mesh.size())
    record: dict[str, Any] = {"weights": {}, "ema": {}, "local": {}}
    named = dict(model.named_parameters())

    def after_step(step: int) -> None:
        record["weights"][step] = {n: plain(w) for n, w in full_weights(model).items()}
        record["local"][step] = {n: t.detach().clone() for n, t in ema.ema_tensors.items()}  # this rank's shards
        record["ema"][step] = {n: plain(whole(t, named[n])) for n, t in ema.ema_tensors.items()}

    seen = train(model, optimizer, ema, range(STEPS), dp_rank, dp_size, after_step)  # TP ranks: the same batches
    record["probe"] = {step: plain(out) for step, out in seen["probe"].items()}
    record["grads"] = seen["grads"]
    record["run"] = (model, optimizer, ema)
    return record


def structure(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict[str, Any]:
    """How the teacher is built: its parameters' types and placements, what memory they share, its hooks."""
    teacher = ema.ema_model
    named = dict(model.named_parameters())
    in_optimizer = {local_tensor(p).data_ptr() for group in optimizer.param_groups for p in group["params"]}
    facts: dict[str, Any] = {
        name: {
            "type": type(p).__name__,
            "placements": str(getattr(p, "placements", None)),
            "student_placements": str(getattr(named[name], "placements", None)),
            "local_shape": tuple(local_tensor(p).shape),
            "shape": tuple(p.shape),
            "shares_average": name in ema.ema_tensors
            and local_tensor(p).data_ptr() == local_tensor(ema.ema_tensors[name]).data_ptr(),
            "shares_student": local_tensor(p).data_ptr() == local_tensor(named[name]).data_ptr(),
            "in_optimizer": local_tensor(p).data_ptr() in in_optimizer,
            "requires_grad": p.requires_grad,
        }
        for name, p in teacher.named_parameters()
    }
    modules = dict(model.named_modules())
    hooks = {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(modules[name]._forward_pre_hooks))
        for name, m in teacher.named_modules()
    }
    return {"parameters": facts, "hooks": hooks, "training": teacher.training, "same": ema.ema_model is teacher}


def two_d(shape: tuple[int, int]) -> dict[str, Any]:
    """:func:`run` with FSDP2 and TP on each parameter, over a ``(dp, tp)`` mesh of ``shape``; the placements."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    record = run(mesh["tp"], mesh["dp"])
    model, _, ema = record.pop("run")
    teacher = dict(ema.ema_model.named_parameters())
    record["placements"] = {n: (str(p.placements), str(teacher[n].placements)) for n, p in model.named_parameters()}
    return record


def main(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record = run(init_device_mesh("cpu", (world,)))
    record["structure"] = structure(*record.pop("run"))
    record["2d"] = {shape: two_d(shape) for shape in ((1, world), (world, 1))}
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
