"""``ema.ema_model`` of an FSDP2-sharded student on 2 CPU ranks: a teacher sharded like the student.

One torchrun launch of ``_teacher_worker.py`` trains with the teacher's outputs in the loss; the expectations
come from :func:`train` in one process (no sharding, the whole batches) and from the uninterrupted 2-rank run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emakit._compat import FSDP2_TORCH, TORCH_VERSION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _teacher_worker import RESUME_AT, STEPS, full_weights, launch, make_run, train

WORKER = Path(__file__).with_name("_teacher_worker.py")
FP32 = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        TORCH_VERSION < FSDP2_TORCH, reason=f"fully_shard is public from torch {'.'.join(map(str, FSDP2_TORCH))} on"
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(WORKER, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    model, optimizer, ema = make_run(sharded=False)
    seen = train(model, optimizer, ema, range(STEPS))
    return {**seen, "weights": full_weights(model)}


def test_teacher_outputs_equal_one_process(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    worst = 0.0
    for rank in ranks:
        for step in range(STEPS):
            expected = single["probe"][step]
            torch.testing.assert_close(rank["uninterrupted"]["probe"][step], expected, **FP32)
            worst = max(worst, (rank["uninterrupted"]["probe"][step] - expected).abs().max().item())
    moved = (single["probe"][STEPS - 1] - single["probe"][1]).abs().max().item()
    assert moved > 1e-2  # the teacher moved: the comparison is not of constants
    print(f"teacher outputs, 2 ranks vs 1 process: max |diff| {worst:.2e} (the teacher moved {moved:.3f})")


def test_student_trained_on_teacher_equals_one_process(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    worst = 0.0
    for rank in ranks:
        for name, expected in single["weights"].items():
            torch.testing.assert_close(rank["uninterrupted"]["weights"][name], expected, **FP32)
            worst = max(worst, (rank["uninterrupted"]["weights"][name] - expected).abs().max().item())
    print(f"student weights, 2 ranks vs 1 process: max |diff| {worst:.2e}")


def test_teacher_parameters_never_get_gradients(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    for seen in (*[r["uninterrupted"] for r in ranks], single):
        assert seen["grads"] and not any(seen["grads"])
    assert not ranks[0]["teacher_training"]


def test_teacher_is_sharded_like_the_student_over_the_average(ranks: list[dict[str, Any]]) -> None:
    for name in ranks[0]["structure"]:
        facts = [r["structure"][name] for r in ranks]
        assert all(f["dtensor"] == "DTensor" and f["placements"] == f["student_placements"] for f in facts)
        assert sum(f["local_rows"] for f in facts) == facts[0]["rows"]  # really sharded, 101 -> 51 + 50
        assert all(not f["requires_grad"] for f in facts)
        if name == "frozen":  # not averaged: the student's own shard, shared
            assert all(f["shares_student"] and not f["shares_average"] for f in facts)
        else:  # the average's own storage, no copy
            assert all(f["shares_average"] and not f["shares_student"] for f in facts)
    assert {r["structure"]["embed.weight"]["local_rows"] for r in ranks} == {51, 50}


def test_resume_mid_run_is_bitwise(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        for step in range(STEPS):
            assert torch.equal(rank["resumed"]["probe"][step], rank["uninterrupted"]["probe"][step]), step
        for name, weight in rank["uninterrupted"]["weights"].items():
            assert torch.equal(rank["resumed"]["weights"][name], weight), name
    assert 0 < RESUME_AT < STEPS


def test_memory_per_rank(ranks: list[dict[str, Any]]) -> None:
    """The teacher adds no storage: per rank the average's bytes (this rank's shards of the averaged
    parameters) and nothing for the teacher; an unsharded teacher would add the whole model."""
    for rank in ranks:
        assert rank["ema_bytes"] < rank["full_bytes"] / 2 + 1024
    r = ranks[0]
    print(
        f"rank 0: student shards {r['student_local_bytes']} B, average {r['ema_bytes']} B, teacher +0 B; "
        f"an unsharded teacher: +{r['full_bytes']} B"
    )
