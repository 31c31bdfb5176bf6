"""``prepare_ema`` with a model sharded by ``fully_shard`` before ``accelerator.prepare``, on 2 CPU ranks.

One torchrun launch of ``_accelerate_fsdp2_worker.py``. Expectations: a float64 EMA of the whole weights
gathered after every step; the model's output inside ``average_parameters()`` against the exported EMA loaded
into a plain model; the training shards unchanged by that; a run resumed from the checkpoint (DCP for the model
and Adam, ``save_ema_state`` for the EMA) against the uninterrupted one, bit for bit; and what Accelerate's own
``save_state`` does with such a model (why the EMA is not registered with it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from emakit._compat import FSDP2_TORCH, TORCH_VERSION

pytest.importorskip("accelerate")
if TORCH_VERSION < FSDP2_TORCH:
    pytest.skip(
        f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on, not {torch.__version__}", allow_module_level=True
    )
from _accelerate_fsdp2_worker import SAVE_AT, SMOOTHING, STEPS, eval_inputs, plain_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from _hf_common import ema_reference

WORKER = Path(__file__).with_name("_accelerate_fsdp2_worker.py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("accelerate_fsdp2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"Accelerate FSDP2 2-rank launch: {time.perf_counter() - start:.1f} s")
    return {"out": out, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]}


def exported(run: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run["out"] / "ema.safetensors"))


def test_the_ema_is_shard_local_and_equals_the_average_of_the_whole_weights(run: dict[str, Any]) -> None:
    rank0, rank1 = run["ranks"]
    assert rank0["num_processes"] == 2 and rank0["dtensor_params"]
    assert len(rank0["weights"]) == STEPS
    for r, rank in enumerate(run["ranks"]):  # each rank holds half of every first dimension
        assert rank["ema"]["0.weight"].shape == (8, 8) and rank["ema"]["2.weight"].shape == (2, 16), r
    expected = ema_reference(rank0["weights"], SMOOTHING)
    whole = exported(run)
    for name, value in expected.items():
        torch.testing.assert_close(whole[name], value, rtol=1e-6, atol=1e-7)
        joined = torch.cat([rank0["ema"][name], rank1["ema"][name]])  # the shards are rows 0-7 and 8-15
        assert torch.equal(joined, whole[name]), name


def test_evaluation_inside_average_parameters_runs_on_the_ema(run: dict[str, Any]) -> None:
    model = plain_model()
    model.load_state_dict(exported(run))
    with torch.no_grad():
        by_hand = model(eval_inputs())
    for rank in run["ranks"]:
        torch.testing.assert_close(rank["ema_output"], by_hand, rtol=1e-6, atol=1e-6)
        assert rank["unchanged_by_eval"]


def test_a_resumed_run_continues_bit_for_bit(run: dict[str, Any]) -> None:
    for r, rank in enumerate(run["ranks"]):
        assert rank["saved_to"].endswith(f"emakit_ema_rank{r}.pt")
        for name, value in rank["ema"].items():
            assert torch.equal(rank["resumed_ema"][name], value), name
        for name, value in rank["training"].items():
            assert torch.equal(rank["resumed_training"][name], value), name
    assert {"emakit_ema_rank0.pt", "emakit_ema_rank1.pt", ".metadata"} <= set(run["ranks"][0]["files"])
    assert SAVE_AT < STEPS


def test_the_ema_is_not_registered_with_save_state_which_cannot_save_such_a_model(run: dict[str, Any]) -> None:
    for rank in run["ranks"]:
        assert not rank["registered"]
    # Accelerate writes the main process's model state dict alone, with safetensors, which cannot read a
    # DTensor's storage (Accelerate 1.16); the error is Accelerate's own
    assert run["ranks"][0]["save_state"] is not None
