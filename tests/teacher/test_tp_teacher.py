"""``ema.ema_model`` of a tensor-parallel student (``parallelize_module``) on 2 CPU ranks, and its EMA.

One torchrun launch of ``_tp_teacher_worker.py`` trains with the teacher's outputs in the loss; the expectations
come from :func:`run` in one process (no parallelism) and from a float64 oracle blending the weights each rank
recorded. The same launch trains with FSDP2 and TP on one 2-D mesh, ``(dp=1, tp=2)`` and ``(dp=2, tp=1)``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emakit._compat import FSDP2_TORCH, TORCH_VERSION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _teacher_worker import BASE, STEPS, cosine_oracle, launch
from _tp_teacher_worker import run

WORKER = Path(__file__).with_name("_tp_teacher_worker.py")
FP32 = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        TORCH_VERSION < FSDP2_TORCH, reason=f"public DTensor and fully_shard from torch {FSDP2_TORCH} on"
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(WORKER, tmp_path_factory.mktemp("tp_teacher"))


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    record = run()
    record.pop("run")
    return record


def oracle(weights: dict[int, dict[str, torch.Tensor]], names: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    """The average after each step in float64: a copy of the first step's weights, then DINO's cosine momentum."""
    average: dict[int, dict[str, torch.Tensor]] = {0: {n: weights[0][n].double() for n in names}}
    for step in range(1, STEPS):
        m = cosine_oracle(step - 1, BASE, 1.0, STEPS)
        average[step] = {n: m * average[step - 1][n] + (1 - m) * weights[step][n].double() for n in names}
    return average


def worst(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected.double()).abs().max().item()


def test_teacher_outputs_equal_one_process(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    diff = 0.0
    for rank in ranks:
        for step in range(STEPS):
            torch.testing.assert_close(rank["probe"][step], single["probe"][step], **FP32)
            diff = max(diff, worst(rank["probe"][step], single["probe"][step]))
    moved = worst(single["probe"][STEPS - 1], single["probe"][1])
    assert moved > 1e-2  # the teacher moved: the comparison is not of constants
    print(f"TP teacher outputs, 2 ranks vs 1 process: max |diff| {diff:.2e} (the teacher moved {moved:.3f})")


def test_ema_equals_one_process_and_float64_oracle(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    names = sorted(single["ema"][0])
    assert names == ["down.bias", "down.weight", "head.bias", "head.weight", "up.bias", "up.weight"]  # not frozen
    vs_single = vs_oracle = 0.0
    for rank in ranks:
        expected = oracle(rank["weights"], names)
        for step in range(STEPS):
            for name in names:
                got = rank["ema"][step][name]
                torch.testing.assert_close(got, single["ema"][step][name], **FP32)
                torch.testing.assert_close(got.double(), expected[step][name], **FP32)
                vs_single = max(vs_single, worst(got, single["ema"][step][name]))
                vs_oracle = max(vs_oracle, worst(got, expected[step][name]))
    print(f"TP EMA, 2 ranks: max |diff| {vs_single:.2e} vs 1 process, {vs_oracle:.2e} vs the float64 oracle")


def test_each_rank_keeps_its_own_shard_of_every_placement(ranks: list[dict[str, Any]]) -> None:
    """Shard(0), Shard(1) (uneven 6 + 5 rows too) and Replicate: this rank's part of the oracle average."""
    names = sorted(ranks[0]["ema"][0])
    seen: set[str] = set()
    diff = 0.0
    for r, rank in enumerate(ranks):
        expected = oracle(rank["weights"], names)
        for name in names:
            placement = rank["structure"]["parameters"][name]["placements"]
            seen.add(placement)
            dim = re.fullmatch(r"\(Shard\(dim=(\d)\),\)", placement)
            for step in range(STEPS):
                part = expected[step][name]
                if dim is not None:
                    part = torch.chunk(part, 2, dim=int(dim.group(1)))[r]
                else:
                    assert placement == "(Replicate(),)"
                torch.testing.assert_close(rank["local"][step][name].double(), part, **FP32)
                diff = max(diff, worst(rank["local"][step][name], part))
    assert seen == {"(Shard(dim=0),)", "(Shard(dim=1),)", "(Replicate(),)"}
    assert [rank["local"][0]["head.weight"].shape[0] for rank in ranks] == [6, 5]
    print(f"TP EMA local shards vs the float64 oracle's parts: max |diff| {diff:.2e}")


def test_teacher_has_the_students_placements_and_hooks_over_the_average(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        structure = rank["structure"]
        for name, facts in structure["parameters"].items():
            assert facts["placements"] == facts["student_placements"], name
            assert not facts["requires_grad"] and not facts["in_optimizer"], name
            if name == "frozen":  # not averaged: the student's own tensor, shared
                assert facts["type"] == "Parameter" and facts["shares_student"] and not facts["shares_average"]
            else:  # a DTensor over the average's own storage: no copy, per step or ever
                assert facts["type"] == "DTensor" and facts["shares_average"] and not facts["shares_student"], name
        for name in ("up", "down", "head"):  # TP's input and output hooks, as on the student
            pre, post, student_pre = structure["hooks"][name]
            assert pre == student_pre >= 1 and post >= 1, name
        assert structure["same"] and not structure["training"]


def test_teacher_parameters_never_get_gradients(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    for seen in (*ranks, single):
        assert seen["grads"] and not any(seen["grads"])


@pytest.mark.parametrize("shape", [(1, 2), (2, 1)], ids=["dp1-tp2", "dp2-tp1"])
def test_fsdp_and_tp_on_one_mesh(ranks: list[dict[str, Any]], single: dict[str, Any], shape: tuple[int, int]) -> None:
    """FSDP2 over ``dp`` and TP over ``tp`` on each parameter: the teacher has the student's 2-D placements, and its
    outputs and the average equal one process's (each 2-rank mesh makes one of the two dimensions trivial)."""
    outputs = average = 0.0
    for rank in ranks:
        found = rank["2d"][shape]
        assert found["placements"]["up.weight"][0].endswith("Shard(dim=0))")  # FSDP2's placement, then TP's
        assert found["placements"]["down.bias"][0] == "(Shard(dim=0), Replicate())"
        assert all(student == teacher for student, teacher in found["placements"].values() if student != "None")
        for step in range(STEPS):
            torch.testing.assert_close(found["probe"][step], single["probe"][step], **FP32)
            outputs = max(outputs, worst(found["probe"][step], single["probe"][step]))
            for name, expected in single["ema"][step].items():
                torch.testing.assert_close(found["ema"][step][name], expected, **FP32)
                average = max(average, worst(found["ema"][step][name], expected))
        assert found["grads"] and not any(found["grads"])
    print(f"FSDP2+TP {shape} teacher vs 1 process: outputs max |diff| {outputs:.2e}, average {average:.2e}")
