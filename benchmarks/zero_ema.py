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
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

STRATEGIES = ("ddp", "zero2", "zero3")


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (smoke test)")
    parser.add_argument("--width", type=int, default=None, help="Linear width (default 1024; quick: 64)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default 24; quick: 3)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; quick: 4)")
    args = parser.parse_args(argv)
    args.width = args.width or (64 if args.quick else 1024)
    args.layers = args.layers or (3 if args.quick else 24)
    args.steps = args.steps or (4 if args.quick else 20)
    return args


def _peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _train(name: str, args: argparse.Namespace) -> tuple[Any, list[float]]:
    """Train one model under ``name``; returns the EMA and the times of its updates."""
    import deepspeed
    from torch import nn

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
    import deepspeed
    import torch.distributed as dist

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
    params = [p for p in ema.model.parameters()]
    model_bytes = sum(p.ds_numel * p.element_size() for p in params)
    largest = max(p.ds_numel * p.element_size() for p in params)
    folder = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    target = Path(str(folder[0]))
    shard = max(largest, model_bytes // 8)
    for label, path, kwargs in (
        ("safetensors, one file", target / "ema.safetensors", {}),
        (f"sharded layout, max_shard_size {shard / 2**20:.3g} MiB", target / "sharded", {"max_shard_size": shard}),
        (".pt (torch.save)", target / "ema.pt", {}),
    ):
        dist.barrier()
        _reset_peak_rss()
        baseline = _peak_rss()
        start = time.perf_counter()
        export_ema_weights(ema, path, **kwargs)
        results[f"export: {label}"] = {
            "seconds": time.perf_counter() - start,
            "rss_mib": (_peak_rss() - baseline) / 2**20,
        }
    results["model_mib"] = model_bytes / 2**20
    results["largest_mib"] = largest / 2**20
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        _print(args, gathered)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's CPU ranks sometimes abort at teardown


def _print(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    model_mib = ranks[0]["model_mib"]
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), {model_mib:.1f} MiB fp32; {args.steps} steps")
    print("== EMA update per optimizer step, 2 CPU ranks, hand-written loop")
    print(f"{'strategy':<28}{'rank':>6}{'update ms':>12}{'EMA KiB':>14}")
    print("-" * 60)
    for name in STRATEGIES:
        for rank, result in enumerate(ranks):
            print(f"{name:<28}{rank:>6}{result[name]['update_ms']:>12.3f}{result[name]['ema_kib']:>14.1f}")
    print()
    print(f"== export of the ZeRO-3 EMA, rank 0 (largest tensor {ranks[0]['largest_mib']:.2f} MiB)")
    print(f"{'format':<48}{'seconds':>10}{'peak RSS MiB':>14}{'/ model':>10}")
    print("-" * 82)
    for key, value in ranks[0].items():
        if key.startswith("export: "):
            label = key[len("export: ") :]
            print(f"{label:<48}{value['seconds']:>10.2f}{value['rss_mib']:>14.2f}{value['rss_mib'] / model_mib:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
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
