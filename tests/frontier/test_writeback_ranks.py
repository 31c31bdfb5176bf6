"""Write-back on 2 CPU ranks: DDP ranks stay bitwise identical (every rank writes its own copy of the same average,
never rank 0 alone), and under FSDP2 each rank writes its shards, with no collective, equal to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _writeback_worker import make_ema, make_net, outcome, train

from emakit._compat import FSDP2_TORCH, TORCH_VERSION

WORKER = Path(__file__).with_name("_writeback_worker.py")
FP32 = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if TORCH_VERSION < FSDP2_TORCH:
        pytest.skip(f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on, not {torch.__version__}")
    out = tmp_path_factory.mktemp("writeback")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    model, ema = make_net(), make_ema()
    ema.attach(model)
    return outcome(model, ema, train(model, ema))


def test_ddp_ranks_stay_bitwise_identical_after_write_back(ranks: list[dict[str, Any]]) -> None:
    first, second = ranks[0]["ddp"], ranks[1]["ddp"]
    assert first["write_back"] == second["write_back"] == {"last": 10, "num_copies": 3, "num_pulls": 6}
    for key in ("weights", "average"):
        for name, tensor in first[key].items():
            assert torch.equal(tensor, second[key][name]), (key, name)


def test_ddp_run_equals_one_process(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    for name, expected in single["weights"].items():
        torch.testing.assert_close(ranks[0]["ddp"]["weights"][name], expected, **FP32)
    moved = max((single["weights"][n] - make_net().state_dict()[n]).abs().max().item() for n in single["weights"])
    assert moved > 1e-2


def test_fsdp_write_back_is_shard_local_and_equals_one_process(
    ranks: list[dict[str, Any]], single: dict[str, Any]
) -> None:
    assert ranks[0]["fsdp_local_rows"] == {"fc1.weight": 5, "fc1.bias": 5, "fc2.weight": 2, "fc2.bias": 2}
    assert ranks[1]["fsdp_local_rows"] == {"fc1.weight": 4, "fc1.bias": 4, "fc2.weight": 1, "fc2.bias": 1}
    worst = 0.0
    for rank in ranks:
        fsdp = rank["fsdp"]
        assert fsdp["collectives"] == []  # 10 updates, 3 copies with optimizer resets, 6 pulls: no communication
        assert fsdp["write_back"] == single["write_back"]
        for key in ("weights", "average"):
            for name, expected in single[key].items():
                torch.testing.assert_close(fsdp[key][name], expected, **FP32)
                worst = max(worst, (fsdp[key][name] - expected).abs().max().item())
    print(f"FSDP2 on 2 ranks vs one process, weights and average after write-back: max |diff| {worst:.2e}")


def test_ddp_step_runs_no_collective_either(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["ddp"]["collectives"] == [] and ranks[1]["ddp"]["collectives"] == []
