"""BatchNorm under Lightning's ModelParallelStrategy (FSDP2, data_parallel_size=2): one rule for what is written.

FSDP2 does not synchronise buffers, so each rank's BatchNorm statistics and its average of them are its own. The
export, the checkpoint folder and the sharded snapshots must all hold the mean over the ranks of each rank's
averaged buffers (the oracle: the per-rank values the worker saved, averaged here in float64), and a resume
from the epoch-0 folder must continue every rank's own sequence bit for bit (the oracle: the uninterrupted fit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import torch

from emakit.checkpoint import read_sharded_checkpoint

WORKER = Path(__file__).with_name("_lightning_bn_worker.py")
FLOATING = ("bn.running_mean", "bn.running_var")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lightning_bn")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    start = time.perf_counter()
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"2-rank Lightning BatchNorm launch: {time.perf_counter() - start:.1f} s")
    return {"out": out, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]}


def mean_of_ranks(ranks: dict[str, Any], name: str) -> torch.Tensor:
    """The oracle: each rank's own averaged buffer, averaged over the ranks in float64."""
    own = [r["uninterrupted"]["ema"][name].double() for r in ranks["ranks"]]
    return (sum(own) / len(own)).float()


def test_each_rank_averages_its_own_statistics_and_counts_alike(ranks: dict[str, Any]) -> None:
    own = [r["uninterrupted"] for r in ranks["ranks"]]
    for name in FLOATING:  # otherwise the tests below could not tell one rank's value from the mean
        assert not torch.allclose(own[0]["ema"][name], own[1]["ema"][name], rtol=1e-3, atol=1e-3), name
        assert not torch.allclose(own[0]["weights"][name], own[1]["weights"][name], rtol=1e-3, atol=1e-3), name
    # the integer buffer counts forward passes: equal on every rank, so it needs no mean
    for held in ("ema", "weights"):
        assert int(own[0][held]["bn.num_batches_tracked"]) == int(own[1][held]["bn.num_batches_tracked"]) == 12


def test_export_holds_the_mean_over_ranks_of_each_ranks_averaged_buffers(ranks: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    exported = load_file(str(ranks["out"] / "export.safetensors"))
    for name in FLOATING:
        assert torch.equal(exported[name], mean_of_ranks(ranks, name)), name
    assert torch.equal(
        exported["bn.num_batches_tracked"], ranks["ranks"][0]["uninterrupted"]["ema"]["bn.num_batches_tracked"]
    )


def test_checkpoint_folder_holds_the_mean_and_each_ranks_own_values(ranks: dict[str, Any]) -> None:
    from emakit.integrations.lightning import SHARDED_STATE_KEY

    saved = read_sharded_checkpoint(ranks["out"] / "ckpt" / "epoch=1.ckpt", keep=lambda k: k[0] == "state_dict")
    published = saved["state_dict"]
    extra = published.pop(SHARDED_STATE_KEY)
    for name in FLOATING:
        assert torch.equal(published[name], mean_of_ranks(ranks, name)), name
        assert torch.equal(extra["ema"][name], mean_of_ranks(ranks, name)), name
        for rank, r in enumerate(ranks["ranks"]):
            own = extra["rank_buffers"][f"rank{rank}"]
            assert own["world_size"] == 2
            assert torch.equal(own["averages"][0][name], r["uninterrupted"]["ema"][name]), (rank, name)
            assert torch.equal(own["training"][name], r["uninterrupted"]["weights"][name]), (rank, name)


def test_sharded_snapshot_holds_the_mean_over_ranks(ranks: dict[str, Any]) -> None:
    snapshot = ranks["out"] / "snapshots" / "snapshot-000001"  # after the 12th and last step
    tensors = read_sharded_checkpoint(snapshot)
    for name in FLOATING:
        assert torch.equal(tensors[f"0/{name}"], mean_of_ranks(ranks, name)), name


def test_resume_continues_every_ranks_own_buffers_bitwise(ranks: dict[str, Any]) -> None:
    for rank, r in enumerate(ranks["ranks"]):
        uninterrupted, resumed = r["uninterrupted"], r["resumed"]
        assert resumed["n_averaged"] == uninterrupted["n_averaged"] == 12
        for held in ("ema", "weights"):  # the average's and the training model's tensors, buffers included
            assert set(resumed[held]) == set(uninterrupted[held])
            for name, value in uninterrupted[held].items():
                assert torch.equal(resumed[held][name], value), (rank, held, name)
