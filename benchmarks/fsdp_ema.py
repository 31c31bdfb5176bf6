"""The EMA at scale on 2 CPU ranks: Lightning ModelParallelStrategy (FSDP2) vs DDP, and the streaming export.

python benchmarks/fsdp_ema.py [--quick] [--width N] [--layers N] [--steps N]

Launches itself with torchrun (2 processes, gloo). For the same MLP (``--layers`` Linear(width, width)), a
Lightning fit under ``strategy="ddp"`` and under ``ModelParallelStrategy`` with ``fully_shard`` per layer, each
with emakit's EMACallback, gives per rank:

- *update ms*: the median time of ``ema.step()`` over the fit's optimizer steps (after the first, which copies);
- *EMA KiB*: the bytes of the average this rank keeps (DDP: the whole model; FSDP2: its shards).

Then the FSDP2 EMA is exported while rank 0's peak RSS (VmHWM, reset before each export) is read: one streamed
safetensors file, Transformers' sharded layout, and a ``.pt`` file (which holds the whole model on rank 0).
glibc is told a fixed mmap threshold, so freed tensors go back to the OS and the peak is what export holds.
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _scale import arguments, measure_exports, print_tables


def _worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from emakit import export_ema_weights
    from emakit.integrations.lightning import EMACallback

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    class MLP(pl.LightningModule):
        def __init__(self, sharded: bool) -> None:
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
            self.sharded = sharded

        def configure_model(self) -> None:
            if self.sharded:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for layer in self.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layers(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    data = TensorDataset(torch.randn(args.steps * 2 * 4, args.width))
    results: dict[str, Any] = {}
    for name in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = MLP(sharded=name == "fsdp2")
        callback = EMACallback(half_life="10ba")
        times: list[float] = []
        step = callback.averager.step

        def timed(*a: Any, step: Any = step, times: list[float] = times, **k: Any) -> bool:
            start = time.perf_counter()
            done = step(*a, **k)
            times.append(time.perf_counter() - start)
            return bool(done)

        callback.averager.step = timed  # type: ignore[method-assign]
        strategy: Any = "ddp" if name == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=args.steps,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=4))
        results[name] = {
            "update_ms": statistics.median(times[1:]) * 1e3,
            "ema_kib": sum(t.numel() * t.element_size() for t in callback.averager.ema_tensors.values()) / 2**10,
        }
        if name == "fsdp2":
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            largest = max(p.numel() * p.element_size() for p in model.parameters())
            folder = Path(tempfile.mkdtemp()) if dist.get_rank() == 0 else None
            target = Path(trainer.strategy.broadcast(str(folder)))
            export = partial(export_ema_weights, callback)
            results.update(measure_exports(export, target, model_bytes, largest, dist.barrier))
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        print_tables(args, gathered, ("ddp", "fsdp2"), "FSDP2 EMA")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's CPU ranks sometimes abort at teardown, after the tables are printed


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.split("\n\n")[0], argv)
    if "RANK" in os.environ:
        _worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    return subprocess.run([*command, *(argv if argv is not None else sys.argv[1:])], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
