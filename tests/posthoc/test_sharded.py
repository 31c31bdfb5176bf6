"""Sharded snapshots (FSDP2 on 2 CPU ranks, gloo): written shard by shard, reconstructed without a process group."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _posthoc_worker import EVERY, PROFILES, UPDATES, data, make_net, train

from emakit._compat import FSDP2_TORCH, TORCH_VERSION
from emakit.posthoc.reconstruction import plan_reconstruction, reconstruct
from emakit.posthoc.snapshots import read_snapshot_index, write_snapshot

WORKER = Path(__file__).with_name("_posthoc_worker.py")
pytestmark = pytest.mark.skipif(
    TORCH_VERSION < FSDP2_TORCH, reason=f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on, not {torch.__version__}"
)


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("posthoc_two_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(out),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"\n2-rank FSDP2 launch with sharded snapshots: {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training in one process without FSDP (the whole batch = both ranks' halves)."""
    out = tmp_path_factory.mktemp("posthoc_single")
    x, y = data()

    def snapshot(t: int, averages: list[dict[str, torch.Tensor]]) -> None:
        write_snapshot(out, t // EVERY - 1, averages, PROFILES, t=t, step=t)

    train(make_net(), x, y, snapshot)
    return out


@pytest.mark.slow
def test_each_rank_writes_only_its_own_shards(launch: Path) -> None:
    import torch.distributed.checkpoint as dcp

    index = read_snapshot_index(launch / "sharded")
    assert [s.t for s in index] == list(range(EVERY, UPDATES + 1, EVERY))
    assert all(s.sharded and s.metadata["world_size"] == 2 for s in index)
    assert all(s.path.name == f"snapshot-{i:06d}" for i, s in enumerate(index))
    metadata = dcp.FileSystemReader(index[-1].path).read_metadata()
    for j in range(len(PROFILES)):
        chunks = metadata.state_dict_metadata[f"{j}/fc1.weight"].chunks  # type: ignore[union-attr]
        assert sorted(tuple(c.offsets) for c in chunks) == [(0, 0), (32, 0)]
        files = {
            tuple(k.offset): v.relative_path for k, v in metadata.storage_data.items() if k.fqn == f"{j}/fc1.weight"
        }
        assert files[(0, 0)] != files[(32, 0)]  # rank 0's rows and rank 1's rows are in each rank's own file
        assert {files[(0, 0)], files[(32, 0)]} == {"__0_0.distcp", "__1_0.distcp"}
    # Nothing else is left in the folder: no temporaries, no unsharded copy.
    assert sorted(p.name for p in (launch / "sharded").iterdir()) == [s.path.name for s in index]


@pytest.mark.slow
@pytest.mark.parametrize("target", [{"sigma_rel": 0.07}, {"sigma_rel": 0.05, "t": 24}, {"half_life": 3.0, "t": 36}])
def test_reconstruction_from_shards_equals_reconstruction_from_gathered_weights(
    launch: Path, target: dict[str, Any]
) -> None:
    sharded = reconstruct(launch / "sharded", **target)
    gathered = reconstruct(launch / "gathered", **target)
    assert list(sharded) == list(gathered)
    for name in gathered:
        assert torch.equal(sharded[name], gathered[name]), name
    assert sharded["calls"].item() == target.get("t", UPDATES)


@pytest.mark.slow
def test_reconstruction_from_shards_equals_an_unsharded_run(launch: Path, single_process: Path) -> None:
    sharded = reconstruct(launch / "sharded", sigma_rel=0.07)
    single = reconstruct(single_process, sigma_rel=0.07)
    assert set(sharded) == set(single)
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    tracked = read_snapshot_index(launch / "sharded")[-1]
    assert tracked.tensors == read_snapshot_index(single_process)[-1].tensors  # same names, shapes, dtypes


@pytest.mark.slow
def test_the_ema_on_an_fsdp2_model_keeps_local_shards_and_snapshots_like_the_kernel_path(launch: Path) -> None:
    """emakit.EMA(sigma_rel=[...], snapshot_*) on the sharded model: each rank stores about half the average,
    and its snapshot series reconstructs exactly what the hand-written kernel path's does."""
    full = sum(t.numel() for t in make_net().state_dict().values())
    for rank in range(2):
        info = torch.load(launch / f"ema_rank{rank}.pt", weights_only=True)
        assert info["sharded"] and info["storage_numel"] < 0.75 * full
    assert [i.t for i in read_snapshot_index(launch / "ema")] == [i.t for i in read_snapshot_index(launch / "sharded")]
    for sigma_rel in (0.05, 0.07, 0.10):
        got = reconstruct(launch / "ema", sigma_rel=sigma_rel)
        expected = reconstruct(launch / "sharded", sigma_rel=sigma_rel)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_raw_weights_of_an_fsdp2_model_are_written_as_shards_and_read_whole(launch: Path) -> None:
    """EMA(snapshot_raw=True) on the sharded model: each snapshot directory holds the raw weights (and the first
    theta_0) as shards; read in one process they are the final weights the ranks gathered."""
    index = read_snapshot_index(launch / "ema")
    assert all(info.sharded and info.raw for info in index) and index[0].start and not index[1].start
    final = torch.load(launch / "ema_final_weights.pt", weights_only=True)
    got = reconstruct(launch / "ema", kernel="raw")
    for name, value in final.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert plan_reconstruction(launch / "ema", kernel="bema").fit_error < 0.05
