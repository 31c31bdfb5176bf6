"""2-rank worker (torchrun, gloo, CPU) for uneven shards in a hand-written loop and for the streaming export.

``torchrun --standalone --nproc_per_node=2 _export_worker.py OUT`` runs

- ``uneven``: a model with a vocabulary of 101, a Linear(6, 5) and a 1-row head (rank 1's shard of it is
  empty), FSDP2-sharded, trained by hand with the EMA stepped after each optimizer step; checks what the
  EMA does against a float64 EMA of the gathered weights, saves it to a DCP folder, resumes a fresh EMA from
  it and continues; exports it in every format;
- ``memory``: a ~270 MB model of 2048x2048 layers, sharded, its EMA exported while rank 0's peak RSS is measured.

Each rank writes what it saw to ``OUT/{part}_rank{R}.pt``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _collectives import count_collectives
from torch import nn
from torch.distributed.fsdp import fully_shard

from emakit import EMA, export_ema_weights
from emakit.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    read_sharded_checkpoint,
    save_sharded_checkpoint,
)
from emakit.parallel.sharding import local_tensor

HALF_LIFE = "2ba"
MEMORY_LAYERS = 16
MEMORY_WIDTH = 2048
MEMORY_SHARD = 32 * 2**20


class UnevenNet(nn.Module):
    """Embedding(101, 6) -> Linear(6, 5) -> ReLU -> Linear(5, 1): 51/50, 3/2 and 1/0 rows on 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(101, 6)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(torch.relu(self.fc(self.emb(tokens).mean(1)))).squeeze(-1)


def make_uneven(seed: int = 0) -> UnevenNet:
    torch.manual_seed(seed)
    model = UnevenNet()
    fully_shard(model.emb)
    fully_shard(model)
    return model


def whole(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
        for n, t in module.state_dict().items()
    }


def local(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: local_tensor(t).detach().clone() for n, t in tensors.items()}


def batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randint(0, 101, (4, 3), generator=g), torch.randn(4, generator=g)) for _ in range(steps)]


def train(
    model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, data: list[Any], record: dict[str, Any]
) -> None:
    """Optimizer steps, each followed by ``ema.step()`` (collectives counted) and the float64 reference EMA."""
    for tokens, target in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(tokens), target).backward()
        optimizer.step()
        with count_collectives() as calls:
            ema.step()
        record["collectives"].append(len(calls))
        weights = whole(model)  # a gather on every rank, outside the update
        reference = record["reference"]
        for name, value in weights.items():
            if not value.is_floating_point():
                reference[name] = value.clone()
            elif name not in reference:
                reference[name] = value.double()
            else:
                reference[name] = (
                    ema.schedule.smoothing * reference[name] + (1 - ema.schedule.smoothing) * value.double()
                )


def uneven(out: Path, rank: int) -> dict[str, Any]:
    model = make_uneven()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = EMA(half_life=HALF_LIFE)
    ema.attach(model)
    record: dict[str, Any] = {"collectives": [], "reference": {}}
    data = batches(rank, 6)
    train(model, ema, optimizer, data[:3], record)
    record["local_shapes"] = {n: tuple(t.shape) for n, t in ema.ema_tensors.items()}

    # Swap: the shards of the average in, the training shards back bitwise.
    before = local(model.state_dict())
    with ema.average_parameters():
        record["swapped_in"] = local(model.state_dict())
    record["swap_after"] = local(model.state_dict())
    record["swap_before"] = before
    record["ema_local"] = {n: t.clone() for n, t in ema.ema_tensors.items()}

    # Save to a DCP folder (every rank its shards), resume a fresh model and EMA from it, continue both.
    folder = out / "uneven_dcp"
    save_sharded_checkpoint({"model": model.state_dict(), "ema": ema.state_dict()}, folder)
    resumed_model = make_uneven(seed=1)
    resumed_ema = EMA(half_life=HALF_LIFE)
    resumed_ema.attach(resumed_model)
    saved = read_sharded_checkpoint(folder, resumed_model)
    resumed_model.load_state_dict(saved["model"])
    resumed_ema.load_state_dict(saved["ema"])
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05)  # plain SGD: no state to carry
    train(model, ema, optimizer, data[3:], record)
    train(resumed_model, resumed_ema, resumed_optimizer, data[3:], {"collectives": [], "reference": {}})
    record["final_ema_local"] = {n: t.clone() for n, t in ema.ema_tensors.items()}
    record["resumed_ema_local"] = {n: t.clone() for n, t in resumed_ema.ema_tensors.items()}

    export_ema_weights(ema, out / "uneven.safetensors")
    export_ema_weights(ema, out / "uneven.pt")
    export_ema_weights(ema, out / "uneven_sharded", max_shard_size=256)
    final = {"model": model.state_dict(), "algorithms": {"EMA": ema.state_dict()}}  # as emakit's Trainer saves
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_weights": "training",
        "state": final,
    }
    save_sharded_checkpoint(checkpoint, out / "uneven_final_dcp")
    record["reference"] = {n: t.float() if t.is_floating_point() else t for n, t in record["reference"].items()}
    return record


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # Linux: the peak RSS (VmHWM) starts again from the current RSS


def memory(out: Path, rank: int) -> dict[str, Any]:
    """Rank 0's peak RSS increase while the sharded EMA of a large model is exported, per format."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(MEMORY_WIDTH, MEMORY_WIDTH) for _ in range(MEMORY_LAYERS)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            local_tensor(p).normal_(0, 0.02)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    ema.step()
    with torch.no_grad():
        for p in model.parameters():
            local_tensor(p).add_(1.0)
    ema.step()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    figures: dict[str, Any] = {"model_bytes": model_bytes, "largest_tensor_bytes": largest, "max_shard": MEMORY_SHARD}
    for label, target, kwargs in (
        ("sharded", out / "big_sharded", {"max_shard_size": MEMORY_SHARD}),
        ("single", out / "big.safetensors", {}),
    ):
        dist.barrier()
        reset_peak_rss()
        baseline = peak_rss_bytes()
        start = time.perf_counter()
        export_ema_weights(ema, target, **kwargs)
        figures[f"{label}_seconds"] = time.perf_counter() - start
        figures[f"{label}_rss_increase"] = peak_rss_bytes() - baseline
    return figures


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for part, run in (("uneven", uneven), ("memory", memory)):
        torch.save(run(out, rank), out / f"{part}_rank{rank}.pt")


if __name__ == "__main__":
    if os.environ.get("RANK") is None:
        raise SystemExit("run under torchrun")
    main(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
