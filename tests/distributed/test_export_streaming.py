"""Uneven and empty FSDP2 shards in a hand-written loop, and the streaming export, on 2 real ranks.

One torchrun launch of ``_export_worker.py``; the expectations are a float64 EMA of the gathered training
weights, a run resumed from a DCP folder against the uninterrupted one, the exports against each other
(single file, ``.pt``, sharded layout, offline from the DCP folder), and rank 0's peak RSS against the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _export_worker import MEMORY_SHARD

from emakit import export_ema_weights

WORKER = Path(__file__).with_name("_export_worker.py")
FP32 = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("export_two_ranks")
    # glibc's default grows its mmap threshold after the first large free and then keeps freed tensors in
    # the heap; a fixed threshold returns each freed tensor at once, so the peak measures what export holds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    start = time.perf_counter()
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"2-rank launch (uneven loop, export memory): {time.perf_counter() - start:.1f} s")
    load = torch.load
    return {
        "out": out,
        "uneven": [load(out / f"uneven_rank{r}.pt", weights_only=True) for r in range(2)],
        "memory": [load(out / f"memory_rank{r}.pt", weights_only=True) for r in range(2)],
    }


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_sharded_layout(folder: Path) -> dict[str, torch.Tensor]:
    """Transformers' layout read with safetensors' own reader, file by file as the index maps them."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_safetensors(folder / name))
    assert {n: index["weight_map"][n] for n in tensors} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_uneven_and_empty_shards_update_with_no_collective(launch: dict[str, Any]) -> None:
    shapes = [r["local_shapes"] for r in launch["uneven"]]
    assert shapes[0] == {
        "emb.weight": (51, 6), "fc.weight": (3, 6), "fc.bias": (3,), "head.weight": (1, 5), "head.bias": (1,),
        "calls": (),
    }  # fmt: skip
    assert shapes[1] == {
        "emb.weight": (50, 6), "fc.weight": (2, 6), "fc.bias": (2,), "head.weight": (0, 5), "head.bias": (0,),
        "calls": (),
    }  # fmt: skip
    for r in launch["uneven"]:
        assert r["collectives"] == [0] * 6


def test_uneven_swap_puts_the_average_in_and_training_shards_back_bitwise(launch: dict[str, Any]) -> None:
    for r in launch["uneven"]:
        assert_equal(r["swap_after"], r["swap_before"])
        assert_equal({n: r["swapped_in"][n] for n in r["ema_local"]}, r["ema_local"])


def test_uneven_resume_from_dcp_folder_continues_exactly(launch: dict[str, Any]) -> None:
    for r in launch["uneven"]:
        assert_equal(r["resumed_ema_local"], r["final_ema_local"])


def test_uneven_export_equals_float64_reference_ema(launch: dict[str, Any]) -> None:
    exported = load_safetensors(launch["out"] / "uneven.safetensors")
    reference = launch["uneven"][0]["reference"]
    assert set(exported) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(exported[name], value, **FP32)


def test_every_export_format_and_the_offline_export_agree(launch: dict[str, Any], tmp_path: Path) -> None:
    out = launch["out"]
    single = load_safetensors(out / "uneven.safetensors")
    assert_equal(torch.load(out / "uneven.pt", weights_only=True), single)
    assert_equal(load_sharded_layout(out / "uneven_sharded"), single)
    # Offline, in this process with no process group: from the DCP folder, streamed tensor by tensor.
    assert export_ema_weights(out / "uneven_final_dcp", tmp_path / "offline.safetensors") is not None
    assert_equal(load_safetensors(tmp_path / "offline.safetensors"), single)
    export_ema_weights(out / "uneven_final_dcp", tmp_path / "offline_sharded", max_shard_size=256)
    assert_equal(load_sharded_layout(tmp_path / "offline_sharded"), single)


def test_rank0_peak_memory_during_export_is_bounded_by_a_shard_not_the_model(launch: dict[str, Any]) -> None:
    figures = launch["memory"][0]
    model, largest = figures["model_bytes"], figures["largest_tensor_bytes"]
    mib = 2**20
    for label in ("sharded", "single"):
        increase = figures[f"{label}_rss_increase"]
        print(
            f"export ({label}): rank 0 peak RSS +{increase / mib:.1f} MiB for a {model / mib:.0f} MiB model "
            f"(largest tensor {largest / mib:.0f} MiB, max_shard_size {MEMORY_SHARD / mib:.0f} MiB), "
            f"{figures[f'{label}_seconds']:.1f} s; rank 1 +{launch['memory'][1][f'{label}_rss_increase'] / mib:.1f} MiB"
        )
        assert increase < MEMORY_SHARD + largest + 16 * mib
        assert increase < model / 4
    files = sorted(p.name for p in (launch["out"] / "big_sharded").iterdir())
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
