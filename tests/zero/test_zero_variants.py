"""SWA, an overlapped EMA and CPU offload under DeepSpeed ZeRO-3 on 2 CPU ranks.

One torchrun launch of ``_zero_variants_worker.py`` per mode. Expectations: the float64 EMA of the whole
weights gathered after every step; for SWA the plain mean of the weights after each step from its start on; the
overlapped EMA bit for bit the plain one; with the optimizer's states and the parameters offloaded to the CPU,
the same EMA oracle (the update then reads the parameter partitions, the master being offloaded).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _launch import deepspeed_env, torchrun

pytest.importorskip("deepspeed")
from _zero_variants_worker import SMOOTHING, STEPS, SWA_START

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from _hf_common import ema_reference

WORKER = Path(__file__).with_name("_zero_variants_worker.py")

pytestmark = pytest.mark.slow


def launch(out: Path, mode: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    torchrun(str(WORKER), str(out), mode, env=deepspeed_env(), what=f"ZeRO-3 {mode}")
    ranks = [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]
    exported = {p.stem.removeprefix(f"{mode}_"): load_file(str(p)) for p in out.glob(f"{mode}_*.safetensors")}
    return {"ranks": ranks, "exported": exported}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(tmp_path_factory.mktemp("zero3_variants"), "variants")


@pytest.fixture(scope="module")
def offload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(tmp_path_factory.mktemp("zero3_offload"), "offload")


def assert_close_to(exported: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert expected
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("setup", ["variants", "offload"])
def test_the_ema_equals_the_float64_average_of_the_whole_weights(setup: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(setup)
    rank0 = run["ranks"][0]
    assert rank0["partitioned"] and len(rank0["weights"]) == STEPS
    assert rank0["offloaded"] == (setup == "offload")
    assert_close_to(run["exported"]["ema"], ema_reference(rank0["weights"], SMOOTHING))


def test_swa_is_the_mean_of_the_weights_from_its_start(variants: dict[str, Any]) -> None:
    weights = variants["ranks"][0]["weights"]
    averaged = weights[SWA_START - 1 :]  # after steps SWA_START..STEPS
    mean = {n: sum(w[n].double() for w in averaged) / len(averaged) for n in weights[0]}
    assert_close_to(variants["exported"]["swa"], mean)
    for rank in variants["ranks"]:
        assert rank["n_averaged"]["swa"] == len(averaged) == STEPS - SWA_START + 1


def test_the_overlapped_ema_is_the_plain_one_bit_for_bit(variants: dict[str, Any]) -> None:
    plain, overlapped = variants["exported"]["ema"], variants["exported"]["overlap"]
    assert plain.keys() == overlapped.keys()
    for name, value in plain.items():
        assert torch.equal(overlapped[name], value), name
