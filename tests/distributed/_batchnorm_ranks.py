"""Shared by the 2-rank BatchNorm tests (emakit's Trainer under FSDP2, Lightning's ModelParallelStrategy): the
launch, the oracle (each rank's own averaged buffer, averaged over the ranks in float64) and the checks of what
each rank holds. Each worker saves ``{"uninterrupted": held, "resumed": held}`` per rank, ``held`` being
``{"ema": own average by name, "weights": own training tensors by name, "n_averaged": int}``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

FLOATING = ("bn.running_mean", "bn.running_var")


def launch(worker: Path, out: Path) -> dict[str, Any]:
    """Run ``worker OUT`` on 2 CPU ranks; returns ``{"out": out, "ranks": [rank 0's record, rank 1's]}``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    start = time.perf_counter()
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"2-rank {worker.stem}: {time.perf_counter() - start:.1f} s")
    return {"out": out, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]}


def mean_of_ranks(ranks: dict[str, Any], name: str) -> torch.Tensor:
    """The oracle: each rank's own averaged buffer, averaged over the ranks in float64."""
    own = [r["uninterrupted"]["ema"][name].double() for r in ranks["ranks"]]
    return (sum(own) / len(own)).float()


def check_own_statistics(ranks: dict[str, Any], forward_passes: int) -> None:
    """The ranks' floating statistics differ (else a test could not tell one rank's from the mean); the integer
    count of forward passes is equal on every rank, in the average and in the model."""
    own = [r["uninterrupted"] for r in ranks["ranks"]]
    for held in ("ema", "weights"):
        for name in FLOATING:
            assert not torch.allclose(own[0][held][name], own[1][held][name], rtol=1e-3, atol=1e-3), (held, name)
        counts = [int(r[held]["bn.num_batches_tracked"]) for r in own]
        assert counts == [forward_passes] * 2, held


def check_own_entries(ranks: dict[str, Any], saved: dict[str, Any]) -> None:
    """``saved`` (a checkpoint's ``rank_buffers``) holds each rank's own averaged and training buffers."""
    for rank, r in enumerate(ranks["ranks"]):
        own = saved[f"rank{rank}"]
        assert own["world_size"] == 2
        for name in FLOATING:
            assert torch.equal(own["averages"][0][name], r["uninterrupted"]["ema"][name]), (rank, name)
            assert torch.equal(own["training"][name], r["uninterrupted"]["weights"][name]), (rank, name)


def check_resumed_bitwise(ranks: dict[str, Any], n_averaged: int, prefix: str = "") -> None:
    """Every rank's resumed average and training tensors (buffers included) equal the uninterrupted run's
    (records ``{prefix}uninterrupted`` and ``{prefix}resumed``)."""
    for rank, r in enumerate(ranks["ranks"]):
        uninterrupted, resumed = r[f"{prefix}uninterrupted"], r[f"{prefix}resumed"]
        assert resumed["n_averaged"] == uninterrupted["n_averaged"] == n_averaged
        for held in ("ema", "weights"):
            assert set(resumed[held]) == set(uninterrupted[held])
            for name, value in uninterrupted[held].items():
                assert torch.equal(resumed[held][name], value), (rank, held, name)
