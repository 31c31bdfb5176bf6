"""The EMA under DeepSpeed ZeRO-3 vs DDP on 2 CPU ranks: update time, EMA bytes per rank, export memory.

python benchmarks/zero_ema.py [--quick] [--width N] [--layers N] [--steps N]

Launches itself with torchrun (2 processes, gloo; ``DS_ACCELERATOR=cpu``). The same MLP (``--layers``
Linear(width, width)) is trained in a hand-written loop under torch's DDP, then with ``deepspeed.initialize`` at
ZeRO-2 and ZeRO-3 (``stage3_param_persistence_threshold: 0``, so every parameter is partitioned), each with an
``emakit.EMA`` attached to the module. Per rank:

- *update ms*: the median time of ``ema.step()`` over the optimizer steps (after the first, which copies);
- *EMA KiB*: the bytes of the average this rank keeps (DDP, ZeRO-2: the whole model; ZeRO-3: its partitions).

Then the ZeRO-3 EMA is exported while rank 0's peak RSS (VmHWM, reset before each export) is read: one
streamed safetensors file, Transformers' sharded layout, and a ``.pt`` file (the whole model on rank 0).
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

STRATEGIES = ("ddp", "zero2", "zero3")


def _train(name: str, args: argparse.Namespace) -> tuple[Any, list[float]]:
    """Train one model under ``name``; returns the EMA and the times of its updates."""
    from torch import nn

    import deepspeed
    from emakit import EMA

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
    if name == "ddp":
        module: nn.Module = model
        engine: Any = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": int(name[-1]), "stage3_param_persistence_threshold": 0},
        }
        engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        module = engine.module
    ema = EMA(half_life="10ba")
    ema.attach(module)
    times = []
    for _ in range(args.steps):
        loss = engine(torch.randn(4, args.width)).square().mean()
        if name == "ddp":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            engine.backward(loss)
            engine.step()
        start = time.perf_counter()
        ema.step()
        times.append(time.perf_counter() - start)
    return ema, times


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import deepspeed
    from emakit import export_ema_weights

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, Any] = {}
    for name in STRATEGIES:
        ema, times = _train(name, args)
        results[name] = {
            "update_ms": statistics.median(times[1:]) * 1e3,
            "ema_kib": sum(t.numel() * t.element_size() for t in ema.ema_tensors.values()) / 2**10,
        }
    params = list(ema.model.parameters())
    model_bytes = sum(p.ds_numel * p.element_size() for p in params)
    largest = max(p.ds_numel * p.element_size() for p in params)
    folder = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    export = partial(export_ema_weights, ema)
    results.update(measure_exports(export, Path(str(folder[0])), model_bytes, largest, dist.barrier))
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        print_tables(args, gathered, STRATEGIES, "ZeRO-3 EMA")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's CPU ranks sometimes abort at teardown


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.split("\n\n")[0], argv)
    if "RANK" in os.environ:
        _worker(args)
        return 0
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "1048576",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    return subprocess.run([*command, *(argv if argv is not None else sys.argv[1:])], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
