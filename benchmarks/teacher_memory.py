"""Per-rank memory of a live EMA teacher on 2 CPU ranks: sharded (``ema.ema_model`` under FSDP2) vs unsharded.

python benchmarks/teacher_memory.py [--width N] [--layers N]

Launches itself with torchrun (2 processes, gloo). The student is ``--layers`` Linear(width, width) layers,
``fully_shard`` per layer. Per rank it prints the bytes of: the student's parameter shards, the average
(``ema.storage.nbytes``), the teacher's own storage (tensors of ``ema.ema_model`` that are neither the average's
nor the student's), and the largest whole tensors alive at once during one teacher forward (measured in the
gather hooks: one FSDP unit at a time); then what an unsharded teacher (a whole copy per rank) would hold.
Byte counts from the tensors themselves; printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from torch import nn


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    return parser.parse_args()


def _worker(width: int, layers: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from emakit import EMA
    from emakit.distributed import local_tensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    full_bytes = sum(p.nbytes for p in model.parameters())
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ema = EMA(half_life="10ba")
    ema.attach(model)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    ema.step()
    teacher = ema.ema_model

    student = sum(local_tensor(p).nbytes for p in model.parameters())
    known = {local_tensor(p).data_ptr() for p in model.parameters()} | {t.data_ptr() for t in ema.ema_tensors.values()}
    own = sum(local_tensor(t).nbytes for t in teacher.parameters() if local_tensor(t).data_ptr() not in known)
    peak = [0]

    def measure(module: nn.Module, args: object) -> None:
        whole = sum(p.nbytes for p in module.parameters() if not hasattr(p, "placements"))
        peak[0] = max(peak[0], whole)

    for layer in teacher:
        layer.register_forward_pre_hook(measure)  # after the gather hook: the unit's tensors are whole now
    with torch.no_grad():
        teacher(torch.randn(4, width))
    line = (
        f"rank {rank}: student shards {student / 2**20:.2f} MiB | average {ema.storage.nbytes / 2**20:.2f} MiB | "
        f"teacher own storage {own / 2**20:.2f} MiB | whole during forward {peak[0] / 2**20:.2f} MiB | "
        f"unsharded teacher would add {full_bytes / 2**20:.2f} MiB "
        f"(sharded teacher persistent+transient / unsharded: {(own + peak[0]) / full_bytes:.3f})"
    )
    gathered = [None, None]
    dist.all_gather_object(gathered, line)
    if rank == 0:
        print("\n".join(str(g) for g in gathered))
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    args = _arguments()
    if "RANK" in os.environ:
        _worker(args.width, args.layers)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        subprocess.run([*command, *sys.argv[1:]], check=True, env=env)
