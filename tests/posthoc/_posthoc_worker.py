"""Worker for the 2-rank post-hoc test: ``torchrun --standalone --nproc_per_node=2 _posthoc_worker.py OUT``.

Trains a small model sharded with FSDP2 (gloo, CPU). Each rank keeps two power-profile averages of its own
parameter shards (blend_averages_ on local tensors, no communication) and every few updates writes them as
a sharded snapshot (DTensors over the local averages: each rank writes its shards) into ``OUT/sharded``.
For the comparison it also gathers the same averages and has rank 0 write them unsharded into
``OUT/gathered``. :func:`train` is shared with the test, which runs it in one process without FSDP. Then
emakit's EMA on the sharded model writes its snapshots, with the raw weights, into ``OUT/ema``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from emakit.engine.blend import blend_averages_
from emakit.posthoc.profiles import PowerProfile
from emakit.posthoc.snapshots import next_snapshot_index, write_snapshot

PROFILES = [PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.10)]
UPDATES = 40
EVERY = 4
WORLD = 2


class Net(nn.Module):
    """Uneven shards over 2 ranks (63 rows: 32 + 31; 5 rows: 3 + 2; 1 row: 1 + an empty shard), an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 63)
        self.fc2 = nn.Linear(63, 5)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 16, generator=g), torch.randn(16, 5, generator=g)


def local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, snapshot: Callable[[int, list[dict[str, torch.Tensor]]], None]
) -> None:
    """SGD on (x, y); after every step both averages are updated; ``snapshot(t, averages)`` every EVERY updates.

    ``averages[j]`` maps names to this process's average tensors (local shards under FSDP2).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    state = model.state_dict(keep_vars=True)
    names = list(state)
    sources = [local(state[n]).detach() for n in names]
    averages = [[torch.empty_like(s) for s in sources] for _ in PROFILES]
    for t in range(1, UPDATES + 1):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sources = [local(t_).detach() for t_ in model.state_dict(keep_vars=True).values()]
        blend_averages_(averages, sources, [1.0 - p.beta(t) for p in PROFILES])
        if t % EVERY == 0:
            snapshot(t, [dict(zip(names, a, strict=True)) for a in averages])


def main(out: Path) -> None:
    import torch.distributed as dist

    from emakit._compat import dtensor_class, fully_shard_function

    fully_shard, DTensor = fully_shard_function(), dtensor_class()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_net()
    fully_shard(model)
    like = model.state_dict(keep_vars=True)
    x, y = data()
    half = len(x) // WORLD
    mine = slice(rank * half, (rank + 1) * half)

    def snapshot(t: int, averages: list[dict[str, torch.Tensor]]) -> None:
        sharded = [
            {
                n: DTensor.from_local(
                    a,
                    like[n].device_mesh,
                    like[n].placements,
                    run_check=False,
                    shape=like[n].shape,
                    stride=like[n].stride(),
                )
                if isinstance(like[n], DTensor)
                else a
                for n, a in average.items()
            }
            for average in averages
        ]
        index = next_snapshot_index(out / "sharded")
        dist.barrier()  # every rank has read the index before rank 0 renames the new snapshot into place
        write_snapshot(out / "sharded", index, sharded, PROFILES, t=t, step=t)
        gathered = [{n: a.full_tensor() if isinstance(a, DTensor) else a for n, a in s.items()} for s in sharded]
        write_snapshot(out / "gathered", t // EVERY - 1, gathered, PROFILES, t=t, step=t)  # rank 0 writes

    train(model, x[mine], y[mine], snapshot)
    dist.barrier()
    ema_run(out, x[mine], y[mine])
    dist.barrier()
    dist.destroy_process_group()


def ema_run(out: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """The same training through emakit's EMA on an FSDP2 model: its shard-local averages and snapshots."""
    from emakit import EMA
    from emakit._compat import fully_shard_function

    fully_shard = fully_shard_function()

    model = make_net()
    fully_shard(model)
    ema = EMA(
        sigma_rel=[p.sigma_rel for p in PROFILES],
        snapshot_interval=f"{EVERY}ba",
        snapshot_folder=out / "ema",
        snapshot_raw=True,
    )
    ema.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(UPDATES):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step()
    final = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in model.state_dict().items()}
    if torch.distributed.get_rank() == 0:
        torch.save(final, out / "ema_final_weights.pt")
    storage = ema.storage
    assert storage is not None
    numel = sum(b.numel() for b in storage.buffers.values())  # this rank's part of one average
    torch.save(
        {"sharded": ema._tracked.sharded, "storage_numel": numel}, out / f"ema_rank{torch.distributed.get_rank()}.pt"
    )


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
