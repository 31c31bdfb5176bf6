"""DINO-style self-distillation on synthetic data with emakit's EMA as the teacher, sharded like the student.

    python examples/teacher_distillation.py                        # one process, own loop
    torchrun --nproc_per_node=2 examples/teacher_distillation.py   # 2 ranks, FSDP2, own loop
    torchrun --nproc_per_node=2 examples/teacher_distillation.py --lightning   # ModelParallelStrategy(dp=2)
    torchrun --nproc_per_node=2 examples/teacher_distillation.py --tp          # 2 ranks, tensor parallel
    torchrun --nproc_per_node=2 examples/teacher_distillation.py --tp --lightning   # ModelParallelStrategy(tp=2)

The teacher is ``ema.ema_model``: under FSDP2 a module sharded like the student over the average's own shards,
under tensor parallelism a module with the student's placements and TP hooks over them, run under ``torch.no_grad()`` every step; its momentum follows DINO's cosine ramp (:class:`CosineMomentum`),
whose length comes from ``max_duration`` (own loop) or ``max_steps`` (Lightning). The centering buffer is
``'share'``: the teacher reads the live center, which is not averaged (see docs/guides/teacher.md).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from emakit import EMA
from emakit.averaging import CosineMomentum

STEPS, BATCH, DIM, PROTOTYPES = 30, 16, 8, 16


class Student(nn.Module):
    """A small MLP backbone and a prototype head, and DINO's center of the teacher's outputs (a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, PROTOTYPES)
        self.register_buffer("center", torch.zeros(PROTOTYPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def views(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noisy views of this rank's share of a global batch drawn around 4 cluster centers."""
    g = torch.Generator().manual_seed(step)
    clusters = torch.randn(4, DIM, generator=torch.Generator().manual_seed(-1)) * 3
    x = clusters[torch.randint(0, 4, (BATCH,), generator=g)] + torch.randn(BATCH, DIM, generator=g)
    x = x[rank * BATCH // world : (rank + 1) * BATCH // world]
    return x + 0.3 * torch.randn(x.shape, generator=g), x + 0.3 * torch.randn(x.shape, generator=g)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    target = torch.softmax((teacher - center) / 0.04, dim=-1)
    return -(target * torch.log_softmax(student / 0.1, dim=-1)).sum(-1).mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor) -> None:
    mean = teacher.mean(0)
    if dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    center.mul_(0.9).add_(mean, alpha=0.1)


def shard(model: nn.Module, mesh: object = None) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in (*model.backbone, model.head):  # type: ignore[union-attr]
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def parallelize(model: Student, mesh: object) -> None:
    """Megatron's MLP split: the first layer column-wise, the second row-wise; the head stays whole."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model.backbone, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})  # type: ignore[arg-type]


def make_ema() -> EMA:
    return EMA(schedule=CosineMomentum(base=0.9, final=1.0), buffers={"center": "share"})


def own_loop(tp: bool) -> float:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    student = Student()
    if world > 1 and tp:
        from torch.distributed.device_mesh import init_device_mesh

        parallelize(student, init_device_mesh("cpu", (world,)))
    elif world > 1:
        shard(student)
    shards = 1 if tp else world  # tensor-parallel ranks all see the whole batch
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ema = make_ema()
    ema.attach(student, max_duration=f"{STEPS}ba")
    loss = torch.zeros(())
    for step in range(STEPS):
        a, b = views(step, rank % shards, shards)
        with torch.no_grad():
            teacher_out = (ema.ema_model if ema.started else student)(a)
        loss = dino_loss(student(b), teacher_out, student.center)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_center(student.center, teacher_out)
        ema.step()
    if rank == 0:
        print(f"own loop on {world} rank(s){' (TP)' if tp else ''}: loss {loss.item():.4f} after {STEPS} steps")
    return loss.item()


def lightning_fit(tp: bool) -> float:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from emakit.integrations.lightning import EMACallback

    class Distillation(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.student = Student()

        def configure_model(self) -> None:
            if tp:
                parallelize(self.student, self.device_mesh["tensor_parallel"])
                return
            shard(self.student, self.device_mesh["data_parallel"])
            from torch.distributed.fsdp import fully_shard

            fully_shard(self, mesh=self.device_mesh["data_parallel"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.student(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            a, b = batch
            averager = next(c for c in self.trainer.callbacks if isinstance(c, EMACallback)).averager
            with torch.no_grad():
                teacher_out = (averager.ema_model if averager.started else self)(a)
            loss = dino_loss(self(b), teacher_out, self.student.center)
            update_center(self.student.center, teacher_out)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    shards = 1 if tp else world  # tensor-parallel ranks all see the whole batch
    data = [views(step, rank % shards, shards) for step in range(STEPS)]
    callback = EMACallback(schedule=CosineMomentum(base=0.9, final=1.0), buffers={"student.center": "share"})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=shards, tensor_parallel_size=world // shards),
        max_steps=STEPS,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Distillation(), torch.utils.data.DataLoader(data, batch_size=None))
    loss = float(trainer.callback_metrics["loss"])
    if trainer.global_rank == 0:
        label = f"Lightning ModelParallelStrategy on {world} rank(s){' (TP)' if tp else ''}"
        print(f"{label}: loss {loss:.4f} after {STEPS} steps")
    return loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lightning", action="store_true", help="Lightning ModelParallelStrategy instead")
    parser.add_argument("--tp", action="store_true", help="tensor parallel over the ranks instead of FSDP2")
    args = parser.parse_args()
    lightning_fit(args.tp) if args.lightning else own_loop(args.tp)
