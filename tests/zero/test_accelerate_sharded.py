"""``prepare_ema`` when each rank holds part of the model, on 2 CPU ranks: Accelerate's DeepSpeed plugin at
ZeRO-3, and a model sharded by ``fully_shard`` before ``accelerator.prepare``.

One torchrun launch of ``_accelerate_worker.py`` per set-up. Expectations: a float64 EMA of the whole weights
gathered after every step; the model's output inside ``average_parameters()`` against the exported EMA loaded
into a plain model; the training parts unchanged by that; a run resumed from the checkpoint against the
uninterrupted one, bit for bit (ZeRO-3: ``save_state``/``load_state``; FSDP2: DCP and ``save_ema_state``); and
what Accelerate's own ``save_state`` does with a model sharded before ``prepare``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emakit._compat import FSDP2_TORCH, TORCH_VERSION

pytest.importorskip("accelerate")
from _accelerate_worker import SAVE_AT, SMOOTHING, STEPS, eval_inputs, plain_model
from _launch import deepspeed_env, torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from _hf_common import ema_reference

WORKER = Path(__file__).with_name("_accelerate_worker.py")

pytestmark = pytest.mark.slow


def launch(out: Path, mode: str) -> dict[str, Any]:
    env = deepspeed_env() if mode == "zero3" else {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun(str(WORKER), str(out), mode, env=env, what=f"Accelerate {mode}")
    return {
        "out": out,
        "mode": mode,
        "ranks": [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)],
    }


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    return launch(tmp_path_factory.mktemp("accelerate_zero3"), "zero3")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if TORCH_VERSION < FSDP2_TORCH:
        pytest.skip(f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on, not {torch.__version__}")
    return launch(tmp_path_factory.mktemp("accelerate_fsdp2"), "fsdp2")


SETUPS = ["zero3", "fsdp2"]


def exported(run: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run["out"] / f"{run['mode']}_ema.safetensors"))


@pytest.mark.parametrize("setup", SETUPS)
def test_the_ema_is_rank_local_and_equals_the_average_of_the_whole_weights(
    setup: str, request: pytest.FixtureRequest
) -> None:
    run = request.getfixturevalue(setup)
    rank0, rank1 = run["ranks"]
    assert rank0["num_processes"] == 2 and rank0["partitioned"]
    assert rank0["kind"] == ("DEEPSPEED" if setup == "zero3" else "NO")
    assert len(rank0["weights"]) == STEPS
    expected = ema_reference(rank0["weights"], SMOOTHING)
    whole = exported(run)
    for name, value in expected.items():
        torch.testing.assert_close(whole[name], value, rtol=1e-6, atol=1e-7)
        # each rank holds half of the parameter: ZeRO-3 a flat half, FSDP2 half of the rows
        assert rank0["ema"][name].numel() == rank1["ema"][name].numel() == value.numel() // 2, name
        joined = torch.cat([rank0["ema"][name].reshape(-1), rank1["ema"][name].reshape(-1)])
        assert torch.equal(joined, whole[name].reshape(-1)), name


@pytest.mark.parametrize("setup", SETUPS)
def test_evaluation_inside_average_parameters_runs_on_the_ema(setup: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(setup)
    model = plain_model()
    model.load_state_dict(exported(run))
    with torch.no_grad():
        by_hand = model(eval_inputs())
    for rank in run["ranks"]:
        torch.testing.assert_close(rank["ema_output"], by_hand, rtol=1e-6, atol=1e-6)
        assert rank["unchanged_by_eval"]


@pytest.mark.parametrize("setup", SETUPS)
def test_a_resumed_run_continues_bit_for_bit(setup: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(setup)
    for rank in run["ranks"]:
        assert not rank["registered"]  # saved per rank by hooks (ZeRO-3) or save_ema_state (FSDP2)
        for name, value in rank["ema"].items():
            assert torch.equal(rank["resumed_ema"][name], value), name
        for name, value in rank["training"].items():
            assert torch.equal(rank["resumed_training"][name], value), name
    assert {"emakit_ema_rank0.pt", "emakit_ema_rank1.pt"} <= set(run["ranks"][0]["files"])
    assert "emakit_ema.pt" not in run["ranks"][0]["files"] and SAVE_AT < STEPS


def test_save_state_cannot_write_a_model_sharded_before_prepare(fsdp2: dict[str, Any]) -> None:
    # Accelerate writes the main process's model state dict alone, with safetensors, which cannot read a
    # DTensor's storage (Accelerate 1.16): the error is Accelerate's own, and why the docs say to use DCP
    assert fsdp2["ranks"][0]["save_state"] is not None
